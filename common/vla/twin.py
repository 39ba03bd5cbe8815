"""The 7B timing twin backend (docs/DESIGN.md §6.5): OpenVLA-7B's language-model shapes, random weights.

A :class:`~common.policy.LayerwisePolicy` with Llama-2-7B's decoder (hidden 4096, 32 layers, 32 heads,
MLP 11008, RMSNorm, rotary positions, SwiGLU; checked against ``transformers.LlamaModel`` by the tests)
and the RFSQ layer decoder of docs/DESIGN.md §9.1 on top (:mod:`common.vla.twin_model`), with shapes
from :mod:`common.vla.twin_config`, a static KV cache and, on CUDA, one CUDA graph per pass shape
(prefix, block 0, block l > 0, verify of k drafted layers), replayed with the inputs copied into
static buffers.

Timing does not depend on weight values; acceptance does, and comes from trained models (the
embedded VLA), never from this twin. The registry (:mod:`common.vla.registry`) knows it as ``twin``
and ``twin-tiny`` (a CPU-test size with the same code paths), both through :func:`load_twin`.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from common.codec import RFSQCodec
from common.policy import LayerwisePolicy, Observation, PolicyOutput, PrefixState
from common.vla.twin_config import TwinConfig, llama7b_config, memory_floor_s, tiny_config
from common.vla.twin_model import TwinModel, layer_step

__all__ = [
    "TwinConfig",
    "TwinModel",
    "TwinPolicy",
    "layer_step",
    "llama7b_config",
    "load_twin",
    "memory_floor_s",
    "tiny_config",
]


class TwinPolicy(LayerwisePolicy):
    """The twin as a :class:`LayerwisePolicy` (static KV cache; CUDA graphs when ``cuda_graphs``)."""

    def __init__(
        self,
        cfg: TwinConfig,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        cuda_graphs: bool = False,
        seed: int = 0,
        sliced_attention: bool = False,
        prefix_flash: bool = False,
    ):
        """sliced_attention: single-block passes attend to the filled part of the cache without a mask
        (one pass shape, and one CUDA graph, per block index) instead of masking the whole cache.
        prefix_flash: the prefix pass attends causally to its own P slots without a mask (flash kernel)."""
        self.cfg = cfg
        self.sliced_attention = sliced_attention
        self.prefix_flash = prefix_flash
        self.shape = cfg.shape
        self.hidden_dim = cfg.hidden_size
        self.device = torch.device(device)
        self.dtype = dtype
        if cuda_graphs and self.device.type != "cuda":
            raise ValueError(f"cuda_graphs needs a CUDA device, got {self.device}")
        self.cuda_graphs = cuda_graphs
        self.backbone_id = (
            f"twin-llama-d{cfg.hidden_size}-l{cfg.num_layers}-p{cfg.prefix_len}@random-seed{seed}"
        )
        torch.manual_seed(seed)
        with torch.device(self.device):
            self.model = TwinModel(cfg).to(dtype).eval()
            self.codec = RFSQCodec(shape=cfg.shape).eval()  # random weights: actions are for shape only
        self.model.requires_grad_(False)
        self.codec.requires_grad_(False)
        B, nh, S, hd = cfg.batch_size, cfg.num_heads, cfg.max_len, cfg.head_dim
        cache_shape = (cfg.num_layers, B, nh, S, hd)
        self.k_cache = torch.zeros(cache_shape, device=self.device, dtype=dtype)
        self.v_cache = torch.zeros(cache_shape, device=self.device, dtype=dtype)
        # Static inputs (graphs read these buffers; eager passes use them too).
        self._start = torch.zeros((), dtype=torch.long, device=self.device)
        self._first_block = torch.zeros((), dtype=torch.long, device=self.device)
        self._prefix_in = torch.zeros(B, cfg.prefix_len, cfg.hidden_size, device=self.device, dtype=dtype)
        self._codes_in: dict[int, torch.Tensor] = {}
        self._graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._pool = None

    # ---- sizes
    def weight_bytes(self) -> int:
        """Bytes of the decoder-layer weights every pass reads (the memory floor's numerator)."""
        return sum(p.numel() * p.element_size() for p in self.model.layers.parameters())

    def kv_bytes(self) -> int:
        """Bytes of the whole KV cache (every pass attends over all of it)."""
        return self.k_cache.numel() * self.k_cache.element_size() * 2

    # ---- static passes (fixed shapes; graph-capturable)
    def _codes_buffer(self, k: int) -> torch.Tensor:
        if k not in self._codes_in:
            s = self.shape
            self._codes_in[k] = torch.zeros(
                self.cfg.batch_size, k, s.chunk_len, s.action_hidden_dim, dtype=torch.long, device=self.device
            )
        return self._codes_in[k]

    def _pass_fn(self, key: tuple) -> Callable[[], torch.Tensor]:
        m = self.model
        if key[0] == "prefix":
            flash = key[1]
            kv_len = self.cfg.prefix_len if flash else None

            def run() -> torch.Tensor:
                h = m(self._prefix_in, self._start, self.k_cache, self.v_cache, kv_len, flash)  # [B, P, D]
                return h[:, -1].float()  # [B, D]

            return run
        _, with_query, k, kv_len = key
        codes = self._codes_buffer(k)

        def run() -> torch.Tensor:
            x = m.embed_blocks(codes, self._first_block, with_query)  # [B, N, D]
            h = m(x, self._start, self.k_cache, self.v_cache, kv_len)  # [B, N, D]
            return m.block_logits(h)  # [B, nb, T, H, G]

        return run

    @torch.no_grad()
    def _run(self, key: tuple) -> torch.Tensor:
        if not self.cuda_graphs:
            return self._pass_fn(key)()
        if key not in self._graphs:
            fn = self._pass_fn(key)
            stream = torch.cuda.Stream(self.device)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                for _ in range(2):  # warm-up outside the graph (allocator, kernels' first launch)
                    fn()
            torch.cuda.current_stream(self.device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool):
                out = fn()
            self._pool = graph.pool()
            self._graphs[key] = (graph, out)
        graph, out = self._graphs[key]
        graph.replay()
        return out.clone()

    def reset_graphs(self) -> None:
        """Drop captured graphs (after switching the layer function)."""
        self._graphs.clear()
        self._pool = None
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()

    def capture_all(self, max_drafted: int) -> None:
        """Capture (or warm up) every pass shape up to ``max_drafted`` drafted layers."""
        state = self.prefix_from_embeds(torch.zeros_like(self._prefix_in))
        self.decode_block(state, None)
        for _ in range(1, self.shape.num_layers):  # one shape per block index with sliced attention
            self.decode_block(state, torch.zeros_like(self._codes_buffer(1)[:, 0]))
            if not self.sliced_attention:
                break
        for k in range(1, max_drafted + 1):
            self.truncate(state, 0)
            self.verify(state, torch.zeros_like(self._codes_buffer(k)))

    # ---- LayerwisePolicy
    def observations_to_inputs(self, observations: list[Observation]) -> tuple[torch.Tensor, ...]:
        cfg = self.cfg
        if len(observations) != cfg.batch_size:
            raise ValueError(
                f"the twin's cache holds a batch of {cfg.batch_size}, got {len(observations)} observations"
            )
        imgs, texts, props = [], [], []
        for obs in observations:
            views = [obs.agentview] + ([obs.wrist] if cfg.num_images == 2 else [])
            frames = []
            for v in views:
                t = (
                    torch.as_tensor(np.ascontiguousarray(v), device=self.device).permute(2, 0, 1).float()
                    / 255.0
                )
                frames.append(
                    F.interpolate(t[None], size=(cfg.image_size, cfg.image_size), mode="bilinear")[0]
                )
            imgs.append(torch.stack(frames))  # [n_img, 3, S, S]
            ids = list(obs.instruction.encode("utf-8")[: cfg.text_len])
            texts.append(ids + [0] * (cfg.text_len - len(ids)))
            props.append(torch.as_tensor(np.asarray(obs.proprio, dtype=np.float32), device=self.device))
        text_ids = torch.tensor(texts, dtype=torch.long, device=self.device)
        return torch.stack(imgs), text_ids, torch.stack(props)

    @torch.no_grad()
    def prefix(self, observations: list[Observation]) -> PrefixState:
        images, text_ids, proprio = self.observations_to_inputs(observations)
        return self.prefix_from_embeds(self.model.embed_prefix(images, text_ids, proprio))

    @torch.no_grad()
    def prefix_from_embeds(self, embeds: torch.Tensor) -> PrefixState:
        """embeds [B, P, D] (e.g. random tokens for timing) -> state after the prefix pass."""
        if tuple(embeds.shape) != tuple(self._prefix_in.shape):
            raise ValueError(
                f"prefix embeddings must be {list(self._prefix_in.shape)}, got {list(embeds.shape)}"
            )
        self._prefix_in.copy_(embeds)
        self._start.fill_(0)
        hidden = self._run(("prefix", self.prefix_flash))  # [B, D]
        return PrefixState(hidden=hidden, cache=None, prefix_len=self.cfg.prefix_len, num_blocks=0)

    def _kv_len(self, block: int) -> int | None:
        """Filled cache length after single block ``block`` (sliced attention), else None (masked)."""
        if not self.sliced_attention:
            return None
        return self.cfg.prefix_len + (block + 1) * self.cfg.block_width

    def _block_start(self, block: int) -> None:
        self._start.fill_(self.cfg.prefix_len + block * self.cfg.block_width)

    @torch.no_grad()
    def decode_block(self, state: PrefixState, prev_codes: torch.Tensor | None) -> torch.Tensor:
        nb = state.num_blocks
        if nb >= self.shape.num_layers:
            raise ValueError(f"all {self.shape.num_layers} layers are decoded already")
        self._block_start(nb)
        kv_len = self._kv_len(nb)
        if prev_codes is None:
            if nb != 0:
                raise ValueError("prev_codes=None (the query block) is only valid for block 0")
            logits = self._run(("blocks", True, 0, kv_len))
        else:
            if nb == 0:
                raise ValueError("block 0 takes the learned queries: pass prev_codes=None")
            self._codes_buffer(1).copy_(prev_codes[:, None])
            self._first_block.fill_(nb)
            logits = self._run(("blocks", False, 1, kv_len))
        state.num_blocks = nb + 1
        return logits[:, 0]  # [B, T, H, G]

    @torch.no_grad()
    def verify(self, state: PrefixState, drafted: torch.Tensor) -> torch.Tensor:
        if state.num_blocks != 0:
            raise ValueError(f"verify needs a fresh prefix state, got {state.num_blocks} decoded blocks")
        k = drafted.shape[1]
        if k + 1 > self.shape.num_layers:
            raise ValueError(f"at most {self.shape.num_layers - 1} drafted layers can be verified, got {k}")
        self._block_start(0)
        if k:
            self._codes_buffer(k).copy_(drafted)
        self._first_block.fill_(1)
        logits = self._run(("blocks", True, k, self._kv_len(0) if k == 0 else None))  # [B, k+1, T, H, G]
        state.num_blocks = k + 1
        return logits

    def truncate(self, state: PrefixState, num_blocks: int) -> None:
        if not 0 <= num_blocks <= state.num_blocks:
            raise ValueError(f"cannot truncate {state.num_blocks} blocks to {num_blocks}")
        state.num_blocks = num_blocks  # later blocks are masked by position; nothing to free

    @torch.no_grad()
    def codes_to_actions(self, codes: torch.Tensor) -> torch.Tensor:
        return self.codec.decode(codes.to(self.device)).clamp(-1.0, 1.0)

    @torch.no_grad()
    def act(self, observations: list[Observation]) -> list[PolicyOutput]:
        state = self.prefix(observations)
        codes = self.decode_sequential(state)  # [B, T, H, L]
        actions = self.codes_to_actions(codes)
        return [
            PolicyOutput(
                hidden=state.hidden[b].cpu().numpy(),
                codes=codes[b].to(torch.uint8).cpu().numpy(),
                actions=actions[b].float().cpu().numpy(),
            )
            for b in range(len(observations))
        ]


# ------------------------------------------------------------------------------------------ the registry's loader
def load_twin(
    device: str | torch.device = "cpu",
    seed: int = 0,
    prefix_tokens: int = 280,
    config: TwinConfig | None = None,
    dtype: torch.dtype = torch.float32,
    cuda_graphs: bool = False,
    sliced_attention: bool = False,
    prefix_flash: bool = False,
    tiny: bool = False,
) -> TwinPolicy:
    """A twin with random weights (``seed``): Llama-2-7B shapes with a 280- or 600-token prefix, or with
    ``tiny`` the few-hundred-kilobyte CPU-test size (:func:`tiny_config`); ``config`` overrides both."""
    if config is None:
        config = tiny_config() if tiny else llama7b_config(prefix_tokens)
    return TwinPolicy(
        config, device=device, dtype=dtype, cuda_graphs=cuda_graphs, seed=seed,
        sliced_attention=sliced_attention, prefix_flash=prefix_flash,
    )  # fmt: skip
