"""`register_transformers`: flash_attention inside transformers models built from tiny configs (never downloaded),
held to transformers' own eager and sdpa attention, with left and right padding."""

import pytest
import torch

from optimized.attention import register_transformers
from tests.models import hf_causal_lm

transformers = pytest.importorskip("transformers")

NAME = register_transformers()


MODELS = {"llama": {}, "gpt2": {}, "mistral": {"kv_heads": 1}, "gemma2": {}}
"""The families and their shapes beyond tests.models' defaults (Mistral: MQA, a sliding window of 4; Gemma-2:
softcap 2.0, every other layer a sliding window)."""


def _model(family: str, impl: str):
    # seeded: the same weights for every attn_implementation
    return hf_causal_lm(family, attn_implementation=impl, **MODELS[family]).eval()


def _batch(padding: str):
    ids = torch.randint(0, 64, (3, 11), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(3, 11, dtype=torch.long)
    if padding == "left":
        mask[0, :4] = mask[1, :1] = 0
    elif padding == "right":
        mask[0, 7:] = mask[2, 10:] = 0
    return ids, mask


@pytest.mark.parametrize("padding", ["none", "left", "right"])
@pytest.mark.parametrize("family", list(MODELS))
def test_logits_equal_eager_and_sdpa(family, padding):
    ids, mask = _batch(padding)
    with torch.no_grad():
        ours = _model(family, NAME)(input_ids=ids, attention_mask=mask).logits
        for impl in ("eager",) if family == "gemma2" else ("eager", "sdpa"):  # transformers: no SDPA for Gemma 2
            theirs = _model(family, impl)(input_ids=ids, attention_mask=mask).logits
            keep = mask.bool()  # logits at pad positions are undefined: every implementation fills them its own way
            torch.testing.assert_close(ours[keep], theirs[keep], rtol=1e-5, atol=1e-5,
                                       msg=lambda m, impl=impl: f"vs {impl}: {m}")


def test_left_padding_is_not_ignored():
    ids, mask = _batch("left")
    model = _model("llama", NAME)
    with torch.no_grad():
        padded = model(input_ids=ids, attention_mask=mask).logits
        unmasked = model(input_ids=ids).logits
    assert (padded[0, -1] - unmasked[0, -1]).abs().max() > 1e-3  # row 0 has 4 pad tokens to ignore


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_gradients_equal_eager(family):
    ids, mask = _batch("left")
    grads = {}
    for impl in (NAME, "eager"):
        model = _model(family, impl)
        logits = model(input_ids=ids, attention_mask=mask).logits
        (logits * mask.unsqueeze(-1)).square().mean().backward()
        grads[impl] = [p.grad for p in model.parameters()]
    for ours, theirs in zip(grads[NAME], grads["eager"], strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-6)


def test_generation_with_a_kv_cache_and_left_padding_equals_eager():
    ids, mask = _batch("left")
    tokens = {impl: _model("llama", impl).generate(input_ids=ids, attention_mask=mask, max_new_tokens=4,
                                                   do_sample=False, pad_token_id=0)
              for impl in (NAME, "eager")}
    assert torch.equal(tokens[NAME], tokens["eager"])


def test_packed_documents_by_position_ids_equal_each_document_alone():
    lengths = [5, 1, 6]
    ids = torch.randint(0, 64, (1, sum(lengths)), generator=torch.Generator().manual_seed(2))
    position_ids = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0)  # (1, 12): restarts at each document
    model = _model("llama", NAME)
    with torch.no_grad():
        packed = model(input_ids=ids, position_ids=position_ids).logits[0]  # (12, vocab)
        alone = torch.cat([model(input_ids=doc).logits[0] for doc in ids.split(lengths, dim=1)])
    torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "mistral", "gemma2"])
def test_packed_documents_through_the_triton_kernels_equal_eager_alone(family):
    # The Triton kernels' varlen mode inside models nobody here wrote: GQA (Llama), a sliding window (Mistral),
    # softcap and windows (Gemma 2); on CPU under Triton's interpreter.
    kernels = pytest.importorskip("optimized.attention.triton.launch", reason="triton is not installed")
    if not kernels.interpreted():
        pytest.skip("the models here run on CPU: needs TRITON_INTERPRET=1 before triton compiled the kernels")
    name = register_transformers("pretrain_spec_triton", backend="triton")
    lengths = [5, 1, 9]
    ids = torch.randint(0, 64, (1, sum(lengths)), generator=torch.Generator().manual_seed(2))
    position_ids = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0)
    with torch.no_grad():
        packed = _model(family, name)(input_ids=ids, position_ids=position_ids).logits[0]
        eager = _model(family, "eager")
        alone = torch.cat([eager(input_ids=doc).logits[0] for doc in ids.split(lengths, dim=1)])
    torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-5)


def test_bad_names_and_dropout_are_refused():
    with pytest.raises(ValueError, match="without 'flash'"):
        register_transformers("my_flash")
    with pytest.raises(ValueError, match="not one of transformers' own"):
        register_transformers("sdpa")
    with pytest.raises(ValueError, match="backend must be"):
        register_transformers("ours", backend="cudnn")
    model = hf_causal_lm("gpt2", attn_implementation=NAME, attn_pdrop=0.1).train()
    with pytest.raises(ValueError, match="attn_pdrop=0.0"):
        model(input_ids=torch.zeros(1, 4, dtype=torch.long))
