"""The FLASH draft model: fusion, latent-aware visual compression and a semi-autoregressive head.

All target weights stay frozen; the draft borrows the target's embedding table and LM head (or a
reduced-vocabulary slice of it). Symbols follow FLASH.md:
- ``f_t = fuse([e_{t+1}; h_t])`` is a *stream* feature for text position ``t``;
- each media span's hidden states ``H`` [N, D] become C latents ``softmax(A H^T / sqrt(D)) H``;
- for the last known position the head builds k *slot* inputs ``f_t + s_i``; slot i attends to
  the cached stream and to slots 0..i, at RoPE position ``t + i``, and regresses ``h_{t+1+i}``.
Only slot 0 (``f_t + s_0``) is a plain causal stream entry, so only it enters the KV cache.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from flash.cpu import cpu_kernels
from flash.cpu.rope import apply_rope, rope_tables

CONFIG_FILE = "draft_config.json"
WEIGHTS_FILE = "draft.safetensors"


class DraftError(ValueError):
    """A draft that cannot be used (missing, corrupt, or trained for another target)."""


@dataclass(frozen=True)
class DraftConfig:
    """Shape of a draft and the target it belongs to (saved next to the weights)."""

    target_name: str
    hidden_size: int
    vocab_size: int
    num_heads: int = 8
    intermediate_size: int = 1536
    k: int = 4  # slots: draft tokens per draft pass
    num_latents: int = 8  # C latents per media span; 0 = no compression (every visual token)
    rope_theta: float = 10000.0
    rms_eps: float = 1e-5
    max_positions: int = 8192
    draft_vocab_size: int = 0  # 0 = the target's full vocabulary
    num_layers: int = 1  # decoder blocks in the SAR head (FLASH and EAGLE use one)

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads or (self.hidden_size // self.num_heads) % 2:
            raise ValueError("hidden_size must split into num_heads heads of even size")
        if self.k < 1:
            raise ValueError("k (draft tokens per pass) must be >= 1")
        if self.num_layers < 1:
            raise ValueError("num_layers must be >= 1")
        if self.num_latents < 0 or self.draft_vocab_size < 0:
            raise ValueError("num_latents and draft_vocab_size must be >= 0")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.fused_op = False  # set by FlashDraft.pack_fp16: one C++ call instead of six ops (inference)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused_op:
            return cpu_kernels.rms_norm(x, self.weight, self.eps)
        return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)


class DecoderBlock(nn.Module):
    """One pre-norm transformer block (RoPE attention + SwiGLU) with an explicit mask."""

    def __init__(self, cfg: DraftConfig) -> None:
        super().__init__()
        d, self.heads, self.head_dim = cfg.hidden_size, cfg.num_heads, cfg.head_dim
        self.attn_norm = RMSNorm(d, cfg.rms_eps)
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.o_proj = nn.Linear(d, d, bias=False)
        self.mlp_norm = RMSNorm(d, cfg.rms_eps)
        self.gate_up = nn.Linear(d, 2 * cfg.intermediate_size, bias=False)
        self.down = nn.Linear(cfg.intermediate_size, d, bias=False)
        self.fused_op = False  # set by FlashDraft.pack_fp16: the rotary embedding as one C++ call (inference)

    def project_kv_q(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """x [B, n, D] -> q, k, v [B, heads, n, head_dim] with RoPE applied to q and k."""
        b, n, _ = x.shape
        qkv = self.qkv(self.attn_norm(x))
        if self.fused_op:  # inference on FLASH's CPU kernels: the same numbers in one call
            q, k = cpu_kernels.rope_qk(qkv, cos.expand(b, n, -1), sin.expand(b, n, -1), self.heads, self.heads)
            return q, k, qkv.view(b, n, 3, self.heads, self.head_dim)[:, :, 2].transpose(1, 2)
        q, k, v = qkv.view(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def finish(self, x: torch.Tensor, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
               mask: torch.Tensor) -> torch.Tensor:
        """Attention of q over (keys, values) under boolean ``mask`` [n, Lk] (True = attend), then MLP."""
        b, _, n, _ = q.shape
        attn = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
        x = x + self.o_proj(attn.transpose(1, 2).reshape(b, n, -1))
        gate, up = self.gate_up(self.mlp_norm(x)).chunk(2, dim=-1)
        return x + self.down(F.silu(gate) * up)


@dataclass
class DraftState:
    """The draft's KV cache for one request, written in place at explicit positions (gpt-fast style).

    ``length`` counts exact stream entries; anything past it (speculative slots) is overwritten.
    """

    keys: torch.Tensor  # [num_layers, 1, heads, max_positions, head_dim]
    values: torch.Tensor
    length: int = 0


class FlashDraft(nn.Module):
    """The trainable part of a FLASH draft. Bind the target's embedding/LM head with :meth:`bind`."""

    def __init__(self, cfg: DraftConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.hidden_size
        # h's rows are ~17x longer than e's (measured on the default target: norms 45 vs 2.7), so an
        # unnormalised fuse would drown the next token's identity; normalise each input (as EAGLE-3).
        self.embed_norm = RMSNorm(d, cfg.rms_eps)
        self.hidden_norm = RMSNorm(d, cfg.rms_eps)
        self.fuse = nn.Linear(2 * d, d, bias=False)
        self.latent_queries = nn.Parameter(torch.randn(max(cfg.num_latents, 1), d) * d**-0.5)
        self.latent_proj = nn.Linear(d, d, bias=False)
        self.slot_embed = nn.Parameter(torch.randn(cfg.k, d) * 0.02)
        self.slot_gate = nn.Parameter(torch.zeros(cfg.k))
        self.blocks = nn.ModuleList(DecoderBlock(cfg) for _ in range(cfg.num_layers))
        # Predictions live where the target's post-norm h lives: a norm whose per-dimension scale
        # (set from data before training) carries h's large outlier dimensions, so the block only
        # has to get the direction right. Without it the draft barely learnt (measured: slot-0 hit
        # rate 8% vs 23% after the same 150 steps on 6 records).
        self.out_norm = RMSNorm(d, cfg.rms_eps)
        # Map from draft-vocabulary index to target token id (identity for the full vocabulary).
        size = cfg.draft_vocab_size or cfg.vocab_size
        self.register_buffer("draft_to_target", torch.arange(size), persistent=True)
        self._embed = None
        self._rope_cache: tuple[torch.Tensor, torch.Tensor] | None = None  # see _rope
        self._columns: tuple[torch.Tensor, torch.Tensor] | None = None  # see target_columns
        self._lookup: tuple[torch.Tensor, list[int], dict[int, int] | None] | None = None  # see vocab_lookup
        self._head_weight: torch.Tensor | None = None
        self._head_fp16: nn.Module | None = None  # set by pack_fp16 (CPU inference)
        self._fp16 = False
        with torch.no_grad():
            self.latent_proj.weight.copy_(torch.eye(d))

    # --- binding to a target ---------------------------------------------------------------------
    def bind(self, target) -> FlashDraft:
        """Borrow ``target``'s frozen embedding and LM head; refuse a draft for another target."""
        if target.name != self.cfg.target_name:
            raise DraftError(
                f"this draft was trained for target '{self.cfg.target_name}', not '{target.name}'; "
                "train one with `python -m flash train` or pass the matching --draft"
            )
        if target.hidden_size != self.cfg.hidden_size:
            raise DraftError(f"draft hidden size {self.cfg.hidden_size} != target's {target.hidden_size}")
        self._embed = target.embed
        head = target.lm_head_weight()  # [V, D]: the target's own storage, on the head's device
        if self.cfg.draft_vocab_size:  # a reduced vocabulary: a copy of its rows only, on the draft's device
            rows = head[self.draft_to_target.to(head.device)]
            self._head_weight = rows.to(self.slot_embed.device, self.slot_embed.dtype)
        else:  # the full vocabulary: the target's head itself, where it lives (a copy only for another dtype)
            self._head_weight = head.to(self.slot_embed.dtype)
        self._head_fp16 = None
        if self._fp16:
            self._pack_head()
        return self

    def pack_fp16(self) -> FlashDraft:
        """CPU inference only: run the linear layers and the head with fp16 weights (:mod:`flash.cpu.fp16_linear`),
        and the norms and rotary embedding as FLASH's C++ ops where they build (one call each; the norms
        equal the module's up to float rounding).

        The saved weights are fp16 already, so only the head (rows of the target's) is rounded. A
        draft step's small matmuls cost ~2x less (see :mod:`flash.cpu.fp16_linear`). No training after this.
        """
        from flash.cpu.fp16_linear import convert_linears

        convert_linears(self)
        if cpu_kernels.kernel_available():
            for module in self.modules():
                if isinstance(module, (RMSNorm, DecoderBlock)):
                    module.fused_op = True
        self._fp16 = True
        if self._head_weight is not None:
            self._pack_head()
        return self.eval()

    def _pack_head(self) -> None:
        """The head as fp16 packed weights; the fp32 rows are dropped (only the packed copy is read)."""
        from flash.cpu.fp16_linear import Fp16Linear

        self._head_fp16 = Fp16Linear.from_weight(self._head_weight)
        self._head_weight = None

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():  # the target's table is frozen: never build a graph through it
            out = self._embed(token_ids).to(self.slot_embed.dtype)
        # Adapters may run under inference_mode; a normal tensor can enter training graphs.
        return out.clone() if out.is_inference() and torch.is_grad_enabled() else out

    def draft_logits(self, features: torch.Tensor) -> torch.Tensor:
        """Predicted features [..., D] -> logits over the draft vocabulary [..., Vd]."""
        if self._head_fp16 is not None:
            return self._head_fp16(features)
        head = self._head_weight
        if head.device != features.device:  # a split target's shared head sits on its last device
            return (features.to(head.device) @ head.T).to(features.device)
        return features @ head.T

    def to_target_ids(self, draft_ids: torch.Tensor) -> torch.Tensor:
        return self.draft_to_target[draft_ids]

    def target_columns(self) -> torch.Tensor | None:
        """Target token id -> column of the draft's vocabulary, -1 where it has none (None: the full
        vocabulary, columns are token ids)."""
        if not self.cfg.draft_vocab_size:
            return None
        vocab = self.draft_to_target
        if self._columns is None or self._columns[0] is not vocab:  # rebuilt if the vocabulary was replaced
            self._columns = (vocab, vocab_columns(vocab, self.cfg.vocab_size))
        return self._columns[1]

    def vocab_lookup(self) -> tuple[list[int], dict[int, int] | None]:
        """Python lookups for per-token work (a draft tree's branches): (column -> target token id;
        target token id -> column, None for the full vocabulary, where columns are token ids)."""
        vocab = self.draft_to_target
        if self._lookup is None or self._lookup[0] is not vocab:  # rebuilt if the vocabulary was replaced
            ids = vocab.tolist()
            columns = {token: column for column, token in enumerate(ids)} if self.cfg.draft_vocab_size else None
            self._lookup = (vocab, ids, columns)
        return self._lookup[1], self._lookup[2]

    def to_target_vocab(self, values: torch.Tensor, fill: float) -> torch.Tensor:
        """Rows over the draft vocabulary [n, Vd] -> rows over the target's [n, V], ``fill`` elsewhere."""
        full = values.new_full((values.shape[0], self.cfg.vocab_size), fill)
        full[:, self.draft_to_target] = values
        return full

    # --- features --------------------------------------------------------------------------------
    def fuse_features(self, hidden: torch.Tensor, next_embeds: torch.Tensor) -> torch.Tensor:
        """f_t = fuse([e_{t+1}; h_t]): hidden, next_embeds [..., D] -> [..., D]."""
        hidden = self.hidden_norm(hidden.to(next_embeds.device, next_embeds.dtype))  # h: the target's output device
        return self.fuse(torch.cat([self.embed_norm(next_embeds), hidden], dim=-1))

    def compress(self, span_hidden: torch.Tensor) -> torch.Tensor:
        """Latent-aware compression of one media span: H [N, D] -> C latents [C, D]."""
        h = self.hidden_norm(span_hidden.to(self.latent_queries.device, self.latent_queries.dtype))
        scores = self.latent_queries @ h.T / math.sqrt(h.shape[-1])  # [C, N]
        return self.latent_proj(scores.softmax(dim=-1) @ h)

    def prompt_stream(self, input_ids: torch.Tensor, media_spans, hidden: torch.Tensor,
                      first_token: int, compress: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Stream features for prompt positions 0..L-2 and the last position's f_{L-1}.

        ``input_ids`` [L], ``hidden`` [L, D]. With ``compress`` each media span is replaced by its C
        latents; otherwise media positions are ordinary fused positions (the EAGLE ablation).
        Returns (stream [S, D], last_feature [D]).
        """
        next_ids = torch.cat([input_ids[1:], input_ids.new_tensor([first_token])])
        fused = self.fuse_features(hidden, self.embed(next_ids))  # [L, D]
        if not (compress and self.cfg.num_latents > 0 and media_spans):
            return fused[:-1], fused[-1]
        pieces, cursor = [], 0
        for start, end in media_spans:
            pieces += [fused[cursor:start], self.compress(hidden[start:end])]
            cursor = end
        pieces.append(fused[cursor:-1])
        return torch.cat(pieces), fused[-1]

    # --- the semi-autoregressive pass ---------------------------------------------------------
    def new_state(self, device=None, dtype=None) -> DraftState:
        cfg = self.cfg
        shape = (cfg.num_layers, 1, cfg.num_heads, cfg.max_positions, cfg.head_dim)
        dtype = dtype or self.slot_embed.dtype
        device = device or self.slot_embed.device
        # Left unset: a pass reads only positions it or an earlier pass wrote (zeroing 2 x 19 MB took
        # ~14 ms at every generation's start on the default model's draft, measured with torch.profiler).
        return DraftState(torch.empty(shape, dtype=dtype, device=device),
                          torch.empty(shape, dtype=dtype, device=device))

    def propose(self, state: DraftState, stream: torch.Tensor, last_feature: torch.Tensor,
                last_hidden: torch.Tensor, num_slots: int) -> torch.Tensor:
        """Append ``stream`` [m, D] to the cache and run ``num_slots`` slots for the last position.

        ``last_feature`` is f_P for the last position P = state.length + m; ``last_hidden`` is h_P
        (the gated residual). Slot 0's key/value is exact and is cached at P. Returns predicted
        features [num_slots, D] (slot i regresses h_{P+1+i}).
        """
        cfg, m, past = self.cfg, stream.shape[0], state.length
        if past + m + num_slots > cfg.max_positions:
            raise DraftError(f"the draft's context is full ({cfg.max_positions} positions)")
        slots = last_feature[None, :] + self.slot_embed[:num_slots]  # [num_slots, D]
        x = torch.cat([stream + self.slot_embed[0], slots])[None]  # [1, m+n, D]
        # RoPE: stream entry j at past+j, slot i at P+i = past+m+i.
        cos, sin = self._rope(x.device)
        end = past + m + num_slots
        cos, sin = cos[past:end], sin[past:end]
        # Stream entries and slot 0 are exact (in every layer: slot 0 sees only the cache and itself),
        # so they count towards the cache's length; slots 1.. are written past it, to be overwritten.
        exact = m + 1
        mask = block_mask(past, m, num_slots, x.device)
        for layer, block in enumerate(self.blocks):
            q, k, v = block.project_kv_q(x, cos, sin)
            cache_k, cache_v = state.keys[layer], state.values[layer]
            cache_k[:, :, past:end] = k
            cache_v[:, :, past:end] = v
            x = block.finish(x, q, cache_k[:, :, :end], cache_v[:, :, :end], mask)
        out = x[0, m:]  # [num_slots, D]
        state.length = past + exact
        return self.out_norm(out + self.slot_gate[:num_slots, None] * last_hidden.to(out.device, out.dtype))

    def _rope(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin for every position the draft can hold, computed once per device (an explicit cache)."""
        if self._rope_cache is None or self._rope_cache[0].device != device:
            positions = torch.arange(self.cfg.max_positions, device=device)
            self._rope_cache = rope_tables(positions, self.cfg.head_dim, self.cfg.rope_theta)
        return self._rope_cache

    def train_forward(self, stream: torch.Tensor, gate_hidden: torch.Tensor) -> torch.Tensor:
        """All slots at the last n stream positions in one pass (teacher forcing).

        ``stream`` [S, D] is the whole fused stream; its last n = ``gate_hidden.shape[0]`` entries
        are the positions trained on, with ``gate_hidden`` [n, D] their h_t. Returns predictions
        [k, n, D]; slot i at position t regresses h_{t+1+i}, seeing exactly what :meth:`propose` sees.
        """
        cfg, k, n, s = self.cfg, self.cfg.k, gate_hidden.shape[0], stream.shape[0]
        tail = stream[s - n :]
        x = torch.cat([stream + self.slot_embed[0]] + [tail + self.slot_embed[i] for i in range(1, k)])[None]
        base = torch.arange(s - n, s, device=stream.device)
        positions = torch.cat([torch.arange(s, device=stream.device)] + [base + i for i in range(1, k)])
        cos, sin = rope_tables(positions, cfg.head_dim, cfg.rope_theta)
        mask = train_mask(s, n, k, stream.device)
        last = len(self.blocks) - 1
        for layer, block in enumerate(self.blocks):
            q, keys, values = block.project_kv_q(x, cos, sin)
            if layer == last:
                # Only the trained positions' rows are read after the last block: the prompt's rows are
                # keys and values there, so their attention output and MLP are not computed.
                x, q, mask = x[:, s - n :], q[:, :, s - n :], mask[s - n :]
            x = block.finish(x, q, keys, values, mask)
        slots = x[0].view(k, n, x.shape[-1])  # rows: the last n stream entries (slot 0), then slots 1..k-1
        return self.out_norm(slots + self.slot_gate[:, None, None] * gate_hidden[None].to(slots.dtype))

    # --- saving and loading -------------------------------------------------------------------
    def save(self, directory: str | Path) -> None:
        """Write ``draft.safetensors`` (fp16) and ``draft_config.json`` into ``directory``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {n: (t.half() if t.is_floating_point() else t).contiguous() for n, t in self.state_dict().items()}
        save_file(tensors, str(directory / WEIGHTS_FILE))
        (directory / CONFIG_FILE).write_text(json.dumps(asdict(self.cfg), indent=2) + "\n")

    @classmethod
    def load(cls, directory: str | Path, dtype: torch.dtype = torch.float32) -> FlashDraft:
        """Load a draft saved by :meth:`save`; a clear :class:`DraftError` if it is missing or broken."""
        directory = Path(directory)
        cfg = read_draft_config(directory)
        try:
            tensors = load_file(str(directory / WEIGHTS_FILE))
        except (OSError, ValueError, TypeError) as exc:
            raise DraftError(f"cannot load a draft from {directory}: {exc}") from None
        draft = cls(cfg)
        # Drafts saved before num_layers existed name their one block "block.".
        tensors = {("blocks.0." + n[6:] if n.startswith("block.") else n): t for n, t in tensors.items()}
        if "draft_to_target" in tensors:
            draft.register_buffer("draft_to_target", tensors["draft_to_target"].long(), persistent=True)
        draft.load_state_dict(tensors, strict=True)
        return draft.to(dtype).eval()


def read_draft_config(directory: str | Path) -> DraftConfig:
    """The shape and target of the draft saved in ``directory``, without reading its weights."""
    try:
        return DraftConfig(**json.loads((Path(directory) / CONFIG_FILE).read_text()))
    except (OSError, ValueError, TypeError) as exc:
        raise DraftError(f"cannot load a draft from {directory}: {exc}") from None


def vocab_columns(draft_to_target: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Target token id -> its column in the reduced vocabulary ``draft_to_target``, -1 where it has none."""
    columns = torch.full((vocab_size,), -1, dtype=torch.long, device=draft_to_target.device)
    columns[draft_to_target] = torch.arange(draft_to_target.numel(), device=draft_to_target.device)
    return columns


def block_mask(past: int, m: int, num_slots: int, device=None) -> torch.Tensor:
    """Boolean mask [m+n, past+m+n] for one draft pass (True = may attend).

    Queries are m stream entries then n slots; keys are the cache (past), the m new stream
    entries, slot 0 (an exact stream entry at position past+m), then slots 1..n-1.
    Stream entry j sees the cache and stream entries <= j. Slot i sees the cache, all m stream
    entries and slots 0..i of its own block.
    """
    n = num_slots
    q = torch.arange(m + n, device=device)[:, None]
    kpos = torch.arange(past + m + n, device=device)[None, :]
    # Every query sees the whole cache, and everything up to and including itself in this block:
    # stream entries and slots are laid out in one causal order, which is exactly the rule above.
    return kpos <= past + q


def train_mask(s: int, n: int, k: int, device=None) -> torch.Tensor:
    """Mask [S+(k-1)n, S+(k-1)n] for :meth:`FlashDraft.train_forward`.

    Rows/keys: the S stream entries (slot 0), then slot 1 at the last n positions, ..., slot k-1.
    A stream entry sees stream entries <= itself. Slot i at position t sees stream entries <= t
    (slot 0 at t is the stream entry t) and slots 1..i at the same t.
    """
    total = s + (k - 1) * n
    idx = torch.arange(total, device=device)
    slot = torch.where(idx < s, 0, (idx - s) // n + 1)  # which slot each row is
    pos = torch.where(idx < s, idx, s - n + (idx - s) % n)  # stream position t of each row
    q_slot, k_slot = slot[:, None], slot[None, :]
    q_pos, k_pos = pos[:, None], pos[None, :]
    see_stream = (k_slot == 0) & (k_pos <= q_pos)
    see_own_block = (k_slot > 0) & (k_pos == q_pos) & (k_slot <= q_slot)
    return see_stream | see_own_block
