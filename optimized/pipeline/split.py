"""Cut a model into pipeline stages: the embedding and the first layers, then layers, then the last layers and head.

A model is described by a `Layout`: where its token embedding, its list of layers and its head live, plus what
every layer needs besides the hidden state (rotary position embeddings, a causal mask, position ids), recomputed on
each stage from the hidden state and the positions, so nothing but the hidden state (B, T, C) travels between
stages. Ready layouts for the families optimized.families knows (the project's GPT, transformers' Llama naming and
the models that copy it, transformers' GPT-2; each family's paths are kept there) and an nn.Sequential (child 0 an
nn.Embedding, the last child the head, every child between a layer). `layout_for(model)` picks one; any other model
passes its own:

    split(model, 4, layout=Layout(token_embedding="embed", layers="encoder.layers", head=("norm", "head"),
                                  layer_inputs=causal_mask_inputs))

Stage s holds a contiguous run of layers; stage 0 adds the embedding in front, the last stage adds the head behind.
Every stage holds at least one layer. Without `boundaries` the cut minimises the largest stage's parameter count
(the usual proxy for balanced memory and compute), counting the output head on the last stage even when it is tied
to the embedding: on separate ranks each holds its own copy (Megatron-LM keeps the word embedding on the first and
the last stage and all-reduces its gradient between them; arXiv 1909.08053, and `PipelineExecutor` does the same).

The stages share the model's modules (nothing is copied): run on one rank, stage by stage, they compute what the
model computes and their gradients land in the model's parameters. Targets are the next tokens already aligned
with the input (B, T), as `reference.data` makes them: the last stage scores logits[:, t] against targets[:, t].
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from optimized.families import FAMILIES, Family, family_of, has_modules

IGNORE_INDEX = -100
"""Targets equal to this are not scored (torch.nn.functional.cross_entropy's convention, the tiny GPT's too)."""

LayerInputs = Callable[[Tensor, Tensor], dict]
"""(hidden (B, T, C), positions (1, T)) -> keyword arguments every layer of the model receives."""


def token_loss_sum(logits: Tensor, targets: Tensor) -> Tensor:
    """Sum of cross-entropy over the tokens whose target is not IGNORE_INDEX (at least fp32)."""
    return F.cross_entropy(
        logits.reshape(-1, logits.size(-1)).to(torch.promote_types(logits.dtype, torch.float32)),  # (B*T, V)
        targets.reshape(-1),  # (B*T,)
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )


def causal_mask_inputs(hidden: Tensor, positions: Tensor) -> dict:
    """Layer inputs of a causal `torch.nn.TransformerEncoderLayer`: src_mask (T, T) with -inf above the diagonal."""
    T = hidden.size(1)
    mask = nn.Transformer.generate_square_subsequent_mask(T, device=hidden.device, dtype=hidden.dtype)  # (T, T)
    return {"src_mask": mask, "is_causal": True}  # is_causal: a hint that src_mask is the causal mask


@dataclass(frozen=True)
class Layout:
    """Where a causal LM keeps its pieces (module paths as in `model.get_submodule`)."""

    token_embedding: str
    """The nn.Embedding the input ids go through."""
    layers: str
    """The nn.ModuleList (or nn.Sequential) of layers; each maps the hidden state (B, T, C) to (B, T, C) (a tuple
    output's first element is taken, as transformers' layers may return one)."""
    head: tuple[str, ...]
    """Modules applied in order after the last layer, ending in the output projection (final norm, lm_head)."""
    position_embedding: str | None = None
    """A learned position table added to the token embedding (GPT-2), or None."""
    after_embedding: tuple[str, ...] = ()
    """Modules applied to the summed embedding before the first layer (GPT-2's dropout)."""
    layer_inputs: LayerInputs | None = field(default=None, compare=False)
    """Keyword arguments every layer needs besides the hidden state, recomputed on each stage."""


def family_layout(model: nn.Module, family: Family) -> Layout:
    """The layout of a model of `family` (optimized.families). transformers' layers get the causal mask (a sliding
    window where the family's config sets one), the position ids and, for Llama's naming, the rotary cos/sin, made
    on each stage as the model's forward makes them once."""
    config = getattr(model, "config", None)
    skipped = []
    if family.logit_softcap and getattr(config, "final_logit_softcapping", None):
        skipped.append("soft-caps its logits in the causal LM's forward, after the head")
    if family.per_layer_attention and "sliding_attention" in (getattr(config, "layer_types", None) or ()):
        skipped.append("gives its sliding-window and global layers (config.layer_types) different masks")
    if skipped:
        raise ValueError(f"split: {type(model).__name__} ({family.description}) {' and '.join(skipped)}, which a "
                         f"stage made of its modules would not do; pass layout=Layout(...) with layer_inputs that "
                         f"make what its layers need")
    position = family.position_embedding
    if position is not None and not has_modules(model, position):
        position = None  # the project's GPT with RoPE: wpe is None
    head = (family.final_norm, family.head)
    if not family.layer_keywords:  # the project's GPT: positions inside its attention (RoPE) or in wpe
        return Layout(family.token_embedding, family.layers, head, position_embedding=position,
                      after_embedding=family.after_embedding)
    from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

    windowed = family.sliding_window and getattr(config, "sliding_window", None) is not None
    make_mask = create_sliding_window_causal_mask if windowed else create_causal_mask
    rotary = model.get_submodule(family.rotary_embedding) if family.rotary_embedding else None

    def layer_inputs(hidden: Tensor, positions: Tensor) -> dict:
        mask = make_mask(config=config, inputs_embeds=hidden, attention_mask=None, cache=None, position_ids=positions)
        out = {"attention_mask": mask, "position_ids": positions}
        if rotary is not None:
            out["position_embeddings"] = rotary(hidden, position_ids=positions)
        return out

    return Layout(family.token_embedding, family.layers, head, position_embedding=position,
                  after_embedding=family.after_embedding, layer_inputs=layer_inputs)


_SPLIT_FAMILIES = tuple(f.name for f in FAMILIES if f.layers is not None)
"""The families with a known list of layers (nn.TransformerEncoder's models name their embedding and head freely)."""


def layout_for(model: nn.Module) -> Layout | None:
    """The ready layout of the model's family (None for an nn.Sequential, which `split` cuts by its children)."""
    if isinstance(model, nn.Sequential):
        return None
    family = family_of(
        model, among=_SPLIT_FAMILIES, context="split: no ready layout",
        purpose="an nn.Sequential is cut by its children; for any other model pass layout=Layout(token_embedding=..., "
                "layers=..., head=(...), layer_inputs=...) naming its modules, e.g. Layout('embed', 'encoder.layers', "
                "('norm', 'head'), layer_inputs=causal_mask_inputs)")
    return family_layout(model, family)


class PipelineStage(nn.Module):
    """One contiguous piece of the model.

    forward(x, targets=None): x is idx (B, T) int64 on the first stage, the hidden state (B, T, C) elsewhere. Returns
    the hidden state (B, T, C), or on the last stage the logits (B, T, V), or with `targets` the summed token loss.
    """

    def __init__(
        self,
        index: int,
        num_stages: int,
        blocks: Sequence[nn.Module],
        block_indices: range,
        *,
        hidden_size: int,
        token_embedding: nn.Embedding | None = None,
        position_embedding: nn.Embedding | None = None,
        after_embedding: Sequence[nn.Module] = (),
        head: Sequence[nn.Module] = (),
        layer_inputs: LayerInputs | None = None,
        tied_embeddings: bool = False,
    ) -> None:
        super().__init__()
        self.index = index
        self.num_stages = num_stages
        self.block_indices = block_indices
        """Indices of the model's layers this stage runs."""
        self.hidden_size = hidden_size
        """Width C of the hidden state sent between stages."""
        self.tied_embeddings = tied_embeddings
        """The head's weight is the token embedding's: first and last stage each use it."""
        self.token_embedding = token_embedding
        self.position_embedding = position_embedding
        self.after_embedding = nn.ModuleList(after_embedding)
        self.blocks = nn.ModuleList(blocks)
        self.head = nn.ModuleList(head)
        self.layer_inputs = layer_inputs
        self.model_signature: tuple = ()
        """(name, shape, dtype) of every parameter of the whole model, set by `split`: ranks compare it at wrap."""

    @property
    def is_first(self) -> bool:
        return self.index == 0

    @property
    def is_last(self) -> bool:
        return self.index == self.num_stages - 1

    def tied_weight(self) -> nn.Parameter | None:
        """The embedding weight shared by the first and last stage (the one this stage uses), if tied."""
        if not self.tied_embeddings:
            return None
        if self.is_first:
            return self.token_embedding.weight
        if self.is_last:
            return self.head[-1].weight
        return None

    def _check_ids(self, idx: Tensor) -> None:
        if idx.dim() != 2 or idx.dtype != torch.long or idx.size(1) == 0:
            raise ValueError(f"idx must be a (B, T) int64 tensor with T >= 1, got shape {tuple(idx.shape)} dtype "
                             f"{idx.dtype}")
        vocab = self.token_embedding.num_embeddings
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= vocab):
            bad = int(idx.min()) if int(idx.min()) < 0 else int(idx.max())
            raise ValueError(f"idx holds token id {bad}, outside [0, vocab_size={vocab})")
        if self.position_embedding is not None and idx.size(1) > self.position_embedding.num_embeddings:
            raise ValueError(f"idx: sequence length T={idx.size(1)} exceeds the position embedding's "
                             f"{self.position_embedding.num_embeddings} positions (block_size)")

    def forward(self, x: Tensor, targets: Tensor | None = None) -> Tensor:
        if self.is_first and self.token_embedding is not None:
            self._check_ids(x)
            positions = torch.arange(x.size(1), device=x.device)  # (T,)
            x = self.token_embedding(x)  # (B, T, C)
            if self.position_embedding is not None:
                x = x + self.position_embedding(positions)  # (B, T, C) + (T, C)
            for module in self.after_embedding:
                x = module(x)
        kwargs = {} if self.layer_inputs is None else self.layer_inputs(
            x, torch.arange(x.size(1), device=x.device).unsqueeze(0))  # positions (1, T)
        for block in self.blocks:
            x = block(x, **kwargs)
            if isinstance(x, tuple):
                x = x[0]  # (B, T, C)
        if not self.is_last:
            return x
        for module in self.head:
            x = module(x)  # ends in the logits (B, T, V)
        if targets is None:
            return x
        return token_loss_sum(x, targets)

    def extra_repr(self) -> str:
        parts = ["embedding"] if self.is_first and self.token_embedding is not None else []
        parts.append(f"layers {self.block_indices.start}..{self.block_indices.stop - 1}")
        if self.is_last:
            parts.append("head")
        return f"stage {self.index} of {self.num_stages}: " + ", ".join(parts)


def _count(modules: Sequence[nn.Module]) -> int:
    seen: dict[int, int] = {}
    for m in modules:
        for p in m.parameters():
            seen[id(p)] = p.numel()
    return sum(seen.values())


def balanced_boundaries(costs: Sequence[int], num_stages: int, first: int = 0, last: int = 0) -> list[int]:
    """Cut points b_1 < ... < b_{S-1} of blocks with these costs into S contiguous non-empty runs, minimising the
    largest run's cost, where the first run also pays `first` and the last `last` (dynamic programming)."""
    n = len(costs)
    prefix = [0]
    for c in costs:
        prefix.append(prefix[-1] + c)

    def cost(s: int, i: int, j: int) -> int:  # stage s holds blocks i .. j-1
        return prefix[j] - prefix[i] + (first if s == 0 else 0) + (last if s == num_stages - 1 else 0)

    # best[s][j]: (largest stage cost, cut points) for blocks 0 .. j-1 in stages 0 .. s
    inf = (float("inf"), [])
    best = [[inf] * (n + 1) for _ in range(num_stages)]
    for j in range(1, n + 1):
        best[0][j] = (cost(0, 0, j), [])
    for s in range(1, num_stages):
        for j in range(s + 1, n + 1):
            options = [(max(best[s - 1][i][0], cost(s, i, j)), best[s - 1][i][1] + [i]) for i in range(s, j)]
            best[s][j] = min(options, key=lambda o: o[0])
    return best[num_stages - 1][n][1]


def _pieces(model: nn.Module, layout: Layout | None) -> dict:
    """The model's embedding, layers and head as modules, each path checked."""
    if layout is None:  # nn.Sequential: child 0 the embedding, the last the head, the rest layers
        children = list(model.children())
        if len(children) < 3 or not isinstance(children[0], nn.Embedding):
            raise ValueError(f"split: an nn.Sequential must hold an nn.Embedding first, at least one layer, and the "
                             f"head last; got {[type(c).__name__ for c in children]}")
        return dict(token=children[0], position=None, after=[], layers=children[1:-1], head=[children[-1]],
                    layer_inputs=None)

    def get(path: str, what: str) -> nn.Module:
        try:
            return model.get_submodule(path)
        except AttributeError:
            raise ValueError(f"split: layout.{what}={path!r} names no module of {type(model).__name__}") from None

    token = get(layout.token_embedding, "token_embedding")
    if not isinstance(token, nn.Embedding):
        raise ValueError(f"split: layout.token_embedding={layout.token_embedding!r} is a {type(token).__name__}, "
                         f"not an nn.Embedding")
    layers = get(layout.layers, "layers")
    if not isinstance(layers, (nn.ModuleList, nn.Sequential)):
        raise ValueError(f"split: layout.layers={layout.layers!r} is a {type(layers).__name__}, not an nn.ModuleList")
    return dict(token=token,
                position=get(layout.position_embedding, "position_embedding") if layout.position_embedding else None,
                after=[get(p, "after_embedding") for p in layout.after_embedding], layers=list(layers),
                head=[get(p, "head") for p in layout.head], layer_inputs=layout.layer_inputs)


def split(model: nn.Module, num_stages: int, boundaries: Sequence[int] | None = None, *,
          layout: Layout | None = None) -> list[PipelineStage]:
    """Cut `model` into `num_stages` PipelineStages.

    layout: where the model's pieces live; default `layout_for(model)` (the project's GPT, HF Llama, HF GPT-2, an
    nn.Sequential). boundaries: the S-1 layer indices where stages 1 .. S-1 begin, strictly increasing in
    1 .. n_layers-1 (e.g. [2] puts layers 0, 1 on stage 0 and 2 .. on stage 1). Default: balanced by parameter
    count."""
    pieces = _pieces(model, layout if layout is not None else layout_for(model))
    layers = pieces["layers"]
    n_layer = len(layers)
    if not isinstance(num_stages, int) or isinstance(num_stages, bool) or num_stages < 1:
        raise ValueError(f"num_stages must be a positive integer, got {num_stages!r}")
    if num_stages > n_layer:
        raise ValueError(
            f"num_stages={num_stages} exceeds the model's {n_layer} blocks: every stage needs at least one block"
        )
    embedding = [m for m in (pieces["token"], pieces["position"], *pieces["after"]) if m is not None]
    if boundaries is None:
        cuts = balanced_boundaries([_count([b]) for b in layers], num_stages, first=_count(embedding),
                                   last=_count(pieces["head"]))
    else:
        cuts = list(boundaries)
        if len(cuts) != num_stages - 1:
            raise ValueError(
                f"boundaries must hold num_stages - 1 = {num_stages - 1} block indices, got {len(cuts)}: {cuts}"
            )
        if any(not isinstance(b, int) or isinstance(b, bool) for b in cuts):
            raise ValueError(f"boundaries must be integers, got {cuts}")
        if any(b <= a for a, b in zip([0] + cuts, cuts + [n_layer], strict=True)):
            raise ValueError(
                f"boundaries must be strictly increasing block indices in 1 .. {n_layer - 1} (every stage needs a "
                f"block), got {cuts}"
            )
    tied = getattr(pieces["head"][-1], "weight", None) is pieces["token"].weight
    signature = tuple((n, tuple(p.shape), str(p.dtype)) for n, p in model.named_parameters())
    edges = [0] + cuts + [n_layer]
    stages = []
    for s in range(num_stages):
        indices = range(edges[s], edges[s + 1])
        first, last = s == 0, s == num_stages - 1
        stages.append(PipelineStage(
            s, num_stages, [layers[i] for i in indices], indices,
            hidden_size=pieces["token"].embedding_dim,
            token_embedding=pieces["token"] if first else None,
            position_embedding=pieces["position"] if first else None,
            after_embedding=pieces["after"] if first else (),
            head=pieces["head"] if last else (),
            layer_inputs=pieces["layer_inputs"],
            tied_embeddings=tied,
        ))
        stages[-1].model_signature = signature
    return stages
