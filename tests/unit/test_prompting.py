"""Prompt learning on the frozen backbone: the hand-run text tower equals open_clip's encode_text."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from adapters.prompts import PromptInputs
from server.clip import Backbone, load_backbone
from server.settings import Settings

# Bit-level agreement is expected (the same ops on the same values; the masked tail adds exact zeros),
# but attention kernels may block a shorter sequence differently: 1e-5 on unit-norm features.
ATOL = 1e-5
SHORT = ("red", "green", "blue")
MIXED = ("red", "dark olive green", "light goldenrod yellow", "x")
# The tiny model's context is 16 tokens: this label is truncated by the tokenizer, EOT at position 15.
LONG = ("red", "a colour with a very long name that does not fit in the context", "blue")


@pytest.fixture(scope="module")
def backbone(tiny_model_dir: Path) -> Backbone:
    return load_backbone(Settings(model=f"local-dir:{tiny_model_dir}", device="cpu", _env_file=None))


def reference(backbone: Backbone, labels: tuple[str, ...], ctx_init: str = "a photo of a") -> torch.Tensor:
    tokens = backbone.tokenizer([f"{ctx_init} {label}." for label in labels])
    with torch.no_grad():
        return torch.nn.functional.normalize(backbone.model.encode_text(tokens).float(), dim=-1)  # [C, D]


@pytest.mark.parametrize("labels", [SHORT, MIXED, LONG], ids=["short", "mixed", "truncated"])
def test_initial_context_reproduces_encode_text(backbone, labels):
    inputs = backbone.prompt_inputs(labels)
    feats = backbone.encode_text_with_context(inputs.ctx_init, inputs)  # [C, D]
    assert feats.shape == (len(labels), backbone.embed_dim)
    torch.testing.assert_close(feats, reference(backbone, labels), atol=ATOL, rtol=0)


@pytest.mark.parametrize("labels", [SHORT, MIXED, LONG], ids=["short", "mixed", "truncated"])
def test_class_prompts_cut_to_their_longest_equal_encode_text(backbone, labels, monkeypatch):
    prompts = [f"a photo of a {label}." for label in labels] + list(labels)  # lengths 3 to 16 tokens
    with torch.no_grad():
        full = backbone.model.encode_text(backbone.tokenizer(prompts))  # all 16 tokens
    expected = torch.nn.functional.normalize(full.float(), dim=-1)
    torch.testing.assert_close(backbone.encode_prompts(prompts), expected, atol=ATOL, rtol=0)
    monkeypatch.setattr("server.clip.backbone.TEXT_CHUNK", 2)  # chunks cut to their own longest prompt
    torch.testing.assert_close(backbone.encode_prompts(prompts), expected, atol=ATOL, rtol=0)


def test_context_is_cut_to_the_longest_prompt(backbone):
    short = backbone.prompt_inputs(SHORT)
    # [SOT] a photo of a <colour> . [EOT]: 8 tokens, half the model's 16.
    assert short.context_length == 8 and backbone.context_length == 16
    assert short.eot.tolist() == [7, 7, 7]
    assert short.n_ctx == 4
    assert short.prefix.shape == (3, 1, 64) and short.suffix.shape == (3, 8 - 1 - 4, 64)
    mixed = backbone.prompt_inputs(MIXED)
    assert mixed.context_length == int(mixed.eot.max()) + 1 < 16
    assert backbone.prompt_inputs(LONG).context_length == 16


def test_initial_context_is_the_embedding_of_the_init_words(backbone):
    inputs = backbone.prompt_inputs(SHORT)
    ids = backbone.tokenizer(["a photo of a"])[0, 1:5]
    assert inputs.ctx_init.dtype == torch.float32
    assert torch.equal(inputs.ctx_init, backbone.model.token_embedding.weight[ids])


def test_another_init_string_sets_the_context_length(backbone):
    inputs = backbone.prompt_inputs(SHORT, ctx_init="a blurry photo of the")
    assert inputs.n_ctx == 5
    feats = backbone.encode_text_with_context(inputs.ctx_init, inputs)
    torch.testing.assert_close(feats, reference(backbone, SHORT, "a blurry photo of the"), atol=ATOL, rtol=0)


def test_the_context_is_used(backbone):
    inputs = backbone.prompt_inputs(SHORT)
    moved = inputs.ctx_init + 0.5 * torch.randn(inputs.ctx_init.shape, generator=torch.Generator().manual_seed(0))
    assert not torch.allclose(backbone.encode_text_with_context(moved, inputs), reference(backbone, SHORT), atol=1e-3)


def test_gradient_reaches_the_context_and_no_model_parameter(backbone):
    before = {k: v.clone() for k, v in backbone.model.state_dict().items()}
    inputs = backbone.prompt_inputs(MIXED)
    ctx = inputs.ctx_init.clone().requires_grad_(True)
    with torch.enable_grad():
        feats = backbone.encode_text_with_context(ctx, inputs)  # [C, D]
        image = torch.nn.functional.normalize(torch.randn(1, feats.shape[1]), dim=-1)  # [1, D]
        loss = (image @ feats.T).softmax(-1).max()
        loss.backward()
    assert ctx.grad is not None and bool(torch.isfinite(ctx.grad).all()) and ctx.grad.abs().sum() > 0
    assert all(not p.requires_grad and p.grad is None for p in backbone.model.parameters())
    after = backbone.model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    # The cached inputs are untouched too: the next request starts from the same context.
    assert torch.equal(inputs.ctx_init, backbone.prompt_inputs(MIXED).ctx_init)
    assert not inputs.ctx_init.requires_grad


def test_stacked_contexts_equal_separate_calls_values_and_gradients(backbone):
    inputs = backbone.prompt_inputs(MIXED)
    noise = torch.randn((3, *inputs.ctx_init.shape), generator=torch.Generator().manual_seed(1))
    stacked_ctx = (inputs.ctx_init + 0.1 * noise).requires_grad_(True)  # [R, n, W]
    with torch.enable_grad():
        stacked = backbone.encode_text_with_context(stacked_ctx, inputs)  # [R, C, D]
        stacked[..., 0].sum().backward()
    assert stacked.shape == (3, len(MIXED), backbone.embed_dim)
    for r in range(3):
        ctx = stacked_ctx[r].detach().clone().requires_grad_(True)
        with torch.enable_grad():
            alone = backbone.encode_text_with_context(ctx, inputs)  # [C, D]
            alone[..., 0].sum().backward()
        torch.testing.assert_close(stacked[r], alone, atol=1e-6, rtol=0)
        torch.testing.assert_close(stacked_ctx.grad[r], ctx.grad, atol=1e-6, rtol=1e-5)


def test_inputs_are_cached_per_label_set_and_init(backbone):
    a = backbone.prompt_inputs(("cat", "dog"))
    assert backbone.prompt_inputs(("cat", "dog")) is a
    assert backbone.prompt_inputs(("dog", "cat")) is not a
    assert backbone.prompt_inputs(("cat", "dog"), ctx_init="a photo of the") is not a
    assert isinstance(a, PromptInputs) and backbone.prompt_cache.bytes >= a.nbytes


def test_inputs_built_inside_inference_mode_still_train(backbone):
    with torch.inference_mode():
        inputs = backbone.prompt_inputs(("plum", "teal"))
    ctx = inputs.ctx_init.clone().requires_grad_(True)
    with torch.enable_grad():
        backbone.encode_text_with_context(ctx, inputs).sum().backward()
    assert ctx.grad is not None


def test_refuses_a_context_that_does_not_fit(backbone):
    with pytest.raises(ValueError, match="does not fit"):
        backbone.prompt_inputs(SHORT, ctx_init=" ".join(["word"] * 20))
    inputs = backbone.prompt_inputs(SHORT)
    with pytest.raises(ValueError, match="ctx has shape"):
        backbone.encode_text_with_context(torch.zeros(3, 64), inputs)
    assert backbone.prompt_learning_error is None


def test_ctx_init_is_counted_in_words_as_the_official_tpt_does(backbone):
    """The official TPT learns one vector per word: "itap" is 2 BPE tokens, "itap of a" learns 3 ("it", "ap", "of")."""
    assert len(backbone.tokenizer.encode("itap of a")) == 4
    inputs = backbone.prompt_inputs(SHORT, ctx_init="itap of a")
    assert inputs.n_ctx == 3
    ids = backbone.tokenizer.encode("itap of a")
    assert torch.equal(inputs.ctx_init, backbone.model.token_embedding.weight[ids[:3]])
    # The fourth token stays in the frozen suffix: the initial prompt is still the whole text.
    feats = backbone.encode_text_with_context(inputs.ctx_init, inputs)
    torch.testing.assert_close(feats, reference(backbone, SHORT, "itap of a"), atol=ATOL, rtol=0)


def test_underscores_in_ctx_init_become_spaces_as_the_official_tpt_does(backbone):
    underscored = backbone.prompt_inputs(SHORT, ctx_init="a_photo_of_a")
    spaced = backbone.prompt_inputs(SHORT, ctx_init="a photo of a")
    assert underscored.n_ctx == 4
    assert torch.equal(underscored.tokens, spaced.tokens)
    assert torch.equal(underscored.ctx_init, spaced.ctx_init)
