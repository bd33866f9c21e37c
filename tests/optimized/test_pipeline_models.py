"""optimized.pipeline on models nobody here wrote: transformers' LlamaForCausalLM (RoPE, RMSNorm, SwiGLU, GQA 4:2,
untied head), GPT2LMHeadModel (Conv1D, tied head across the first and last rank) and a causal LM on
torch.nn.TransformerEncoder (`split(..., layout=Layout(...))`), cut with `split` and run through GPipe, 1F1B and
interleaved 1F1B on 2 and 3 gloo ranks: the loss and every gradient on every rank against the same model in one
process on the whole batch (float64). Also: ranks that split different models get an error naming the first
difference, at wrap time."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from conformance.launch import spawn
from optimized.pipeline import (
    Layout,
    PipelineExecutor,
    causal_mask_inputs,
    gpipe,
    interleaved_one_f_one_b,
    one_f_one_b,
    split,
)

transformers = pytest.importorskip("transformers")

TIMEOUT = 180.0
LAYERS, VOCAB, T = 6, 64, 8


class EncoderLM(nn.Module):
    """A causal LM made of torch's own layers: embedding, nn.TransformerEncoder with a causal mask, norm, head."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, width)
        layer = nn.TransformerEncoderLayer(width, nhead=4, dim_feedforward=2 * width, dropout=0.0, batch_first=True,
                                           norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, LAYERS, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, VOCAB, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.embed(idx)
        for layer in self.encoder.layers:
            x = layer(x, **causal_mask_inputs(x, None))
        return self.head(self.norm(x))


ENCODER_LAYOUT = Layout("embed", "encoder.layers", ("norm", "head"), layer_inputs=causal_mask_inputs)


def _model(family: str, width: int = 32) -> nn.Module:
    torch.manual_seed(0)
    if family == "llama":
        cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=width, intermediate_size=2 * width,
                                       num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=2,
                                       max_position_embeddings=T, attn_implementation="eager")
        return transformers.LlamaForCausalLM(cfg).double()
    if family == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=VOCAB, n_embd=width, n_layer=LAYERS, n_head=4, n_positions=T,
                                      bos_token_id=0, eos_token_id=0,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, attn_implementation="eager")
        return transformers.GPT2LMHeadModel(cfg).double()
    return EncoderLM(width).double()


def _logits(model: nn.Module, idx: torch.Tensor) -> torch.Tensor:
    out = model(idx)
    return out.logits if hasattr(out, "logits") else out


def _batch(m: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(m)
    idx = torch.randint(0, VOCAB, (m, T), generator=gen)
    targets = torch.randint(0, VOCAB, (m, T), generator=gen)
    targets[0, :5] = -100  # micro-batches with different numbers of scored tokens
    return idx, targets


def _schedules(p: int, m: int):
    return {"gpipe": gpipe(p, m), "1f1b": one_f_one_b(p, m), "interleaved": interleaved_one_f_one_b(p, m, 2)}


def _worker(families: tuple[str, ...]) -> dict:
    rank, p = dist.get_rank(), dist.get_world_size()
    m = 2 * p
    idx, targets = _batch(m)
    errors = {}
    for family in families:
        reference = _model(family)
        logits = _logits(reference, idx)
        n = int((targets != -100).sum())
        want_loss = F.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1), reduction="sum") / n
        want_loss.backward()
        want = {n_: p_.grad for n_, p_ in reference.named_parameters()}
        for name, schedule in _schedules(p, m).items():
            model = _model(family)
            layout = ENCODER_LAYOUT if family == "encoder" else None
            stages = split(model, schedule.num_stages, layout=layout)
            executor = PipelineExecutor([stages[s] for s in schedule.stages_of(rank)], schedule)
            result = executor.step(idx, targets)
            mine = {id(q) for q in executor.parameters()}
            worst = 0.0
            for pname, param in model.named_parameters():
                if id(param) in mine:
                    worst = max(worst, ((param.grad - want[pname]).abs().max() / want[pname].abs().max()).item())
            if result.loss is not None:
                worst = max(worst, abs(result.loss.item() - want_loss.item()))
            errors[f"{family} {name}"] = worst
    return errors


@pytest.mark.parametrize("world_size", [2, 3])
def test_schedules_on_models_nobody_here_wrote_equal_one_process(world_size):
    families = ("llama", "gpt2", "encoder") if world_size == 2 else ("llama", "gpt2")
    for rank, errors in enumerate(spawn(_worker, world_size, families, timeout=TIMEOUT)):
        assert len(errors) == 3 * len(families)
        bad = {k: e for k, e in errors.items() if not e < 1e-10}
        assert not bad, f"rank {rank}: {bad}"


def _disagree_worker() -> list[str]:
    """Each disagreement is found by one collective that every rank joins, so every rank raises the same error."""
    rank = dist.get_rank()
    messages = []
    with pytest.raises(ValueError, match=r"hidden_size is 32 on rank 0 but 48 on rank 1") as e:
        PipelineExecutor(split(_model("llama", width=32 if rank == 0 else 48), 2)[rank], gpipe(2, 2))
    messages.append(str(e.value))
    wider = _model("llama")
    if rank == 1:  # one wider MLP layer, same hidden size
        wider.model.layers[0].mlp.up_proj = nn.Linear(32, 80, bias=False).double()
    with pytest.raises(ValueError, match=r"parameter 'model.layers.0.mlp.up_proj.weight' \(64, 32\) torch.float64 "
                                         r"on rank 0, 'model.layers.0.mlp.up_proj.weight' \(80, 32\)"):
        PipelineExecutor(split(wider, 2)[rank], gpipe(2, 2))
    executor = PipelineExecutor(split(_model("llama"), 2)[rank], gpipe(2, 2))
    idx, targets = _batch(2 if rank == 0 else 4)
    with pytest.raises(ValueError, match=r"disagree on the batch: idx shape \(2, 8\) on rank 0 but \(4, 8\) on rank 1"):
        executor.step(idx, targets)
    return messages


def test_ranks_that_disagree_get_an_error_naming_the_first_difference():
    assert all(len(m) == 1 for m in spawn(_disagree_worker, 2, timeout=TIMEOUT))
