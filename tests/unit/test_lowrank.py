"""LoRA on the frozen vision tower (TTL): the prefix/suffix split equals open_clip's encode_image.

Three tiny towers: the conftest ViT (class-token pooling), a ViT with LayerScale and average pooling,
and a ModifiedResNet (attention-pool LoRA).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from types import SimpleNamespace

import open_clip
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from adapters.lowrank import LoraFactors, LoraTargets
from server.clip import Backbone, load_backbone
from server.clip.lowrank import lora_block
from server.settings import Settings
from tests.support.model import TINY_CONFIG, TINY_PREPROCESS

# The same math as encode_image in a different op order (packed in-projection sliced by hand, SDPA
# instead of MultiheadAttention's fused inference path, one query row in the last block, the low-rank
# term as (x A^T) B^T rather than folded into the weight): float32 rounding, ~1e-7 on unit-norm features.
ATOL = 1e-5
# Stacked requests run the same ops on a larger batch; only batched-matmul blocking can differ.
STACK_ATOL = 1e-6
# Gradients sum over a batch of R*N images instead of N: a different reduction order, seen up to 1.7e-6 apart.
STACK_GRAD_ATOL = 1e-5

VIT_LS_AVG = {
    **TINY_CONFIG,
    "vision_cfg": {**TINY_CONFIG["vision_cfg"], "layers": 3, "ls_init_value": 0.5, "pool_type": "avg"},
}
# open_clip builds a ModifiedResNet when vision_cfg.layers is a list: width 16 gives a 512-wide
# attention pool with 8 heads; 64 px gives a 2x2 feature map, so the pool attends over 5 tokens.
RESNET = {**TINY_CONFIG, "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 16, "head_width": 64}}


def write_model(folder: Path, cfg: dict, seed: int) -> Path:
    torch.manual_seed(seed)
    model = open_clip.model.CLIP(**cfg)
    for m in model.modules():  # non-trivial BatchNorm statistics and scales (open_clip zero-inits bn3)
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
    folder.mkdir(parents=True)
    size = cfg["vision_cfg"]["image_size"]
    (folder / "open_clip_config.json").write_text(
        json.dumps({"model_cfg": cfg, "preprocess_cfg": {**TINY_PREPROCESS, "size": size}})
    )
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "open_clip_model.safetensors"))
    return folder


@pytest.fixture(scope="module")
def backbones(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Backbone]:
    root = tmp_path_factory.mktemp("lowrank")
    dirs = {
        "vit": tiny_model_dir,
        "vit-ls-avg": write_model(root / "vit", VIT_LS_AVG, 1),
        "resnet": write_model(root / "resnet", RESNET, 2),
    }
    return {k: load_backbone(Settings(model=f"local-dir:{d}", device="cpu", _env_file=None)) for k, d in dirs.items()}


def images(bb: Backbone, n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, *bb.image_size, generator=torch.Generator().manual_seed(seed))  # [N, 3, H, W]


def factors(targets: LoraTargets, seed: int, b_scale: float = 0.0) -> LoraFactors:
    """Fresh factors; with b_scale > 0, B is random too, so the delta is not zero."""
    gen = torch.Generator().manual_seed(seed)
    lora = LoraFactors.init(targets, generator=gen)
    if b_scale:
        with torch.no_grad():
            for b in lora.b:
                b.copy_(b_scale * torch.randn(b.shape, generator=gen))
    return lora


def encode(bb: Backbone, model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return F.normalize(model.encode_image(x).float(), dim=-1)  # [N, D]


def merged_reference(bb: Backbone, lora: LoraFactors, x: torch.Tensor) -> torch.Tensor:
    """encode_image of a copy whose q/v weights have delta_W = (alpha / r) B A added in place."""
    model = copy.deepcopy(bb.model)
    with torch.no_grad():
        for t, a, b in zip(lora.targets.targets, lora.a, lora.b, strict=True):
            delta = lora.scaling * b @ a  # [out, in]
            if t.block < 0:  # ResNet attention pool: separate Linear layers
                getattr(model.visual.attnpool, f"{t.proj}_proj").weight += delta
            else:  # packed in_proj_weight [3W, W]: q rows 0:W, v rows 2W:3W
                w = t.in_features
                rows = slice(0, w) if t.proj == "q" else slice(2 * w, 3 * w)
                model.visual.transformer.resblocks[t.block].attn.in_proj_weight[rows] += delta
    return encode(bb, model, x)


def state(bb: Backbone) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in bb.model.state_dict().items()}


CASES = [("vit", 2), ("vit", 1), ("vit-ls-avg", 3), ("vit-ls-avg", 2), ("resnet", 3)]
IDS = [f"{m}-{n}blocks" for m, n in CASES]


def test_targets_are_the_q_and_v_projections(backbones):
    vit = backbones["vit"].lora_targets()  # the tiny ViT has 2 blocks: TTL's 3 become all of them
    assert vit.tower == "vit" and vit.blocks == (0, 1) and vit.first_block == 0
    assert [t.name for t in vit.targets] == [f"transformer.resblocks.{i}.attn.{p}" for i in (0, 1) for p in "qv"]
    assert all((t.in_features, t.out_features) == (64, 64) for t in vit.targets)
    assert backbones["vit-ls-avg"].lora_targets(1).blocks == (2,)
    res = backbones["resnet"].lora_targets()
    assert res.tower == "resnet" and res.blocks == ()
    assert [(t.name, t.in_features, t.out_features) for t in res.targets] == [
        ("attnpool.q_proj", 512, 512),
        ("attnpool.v_proj", 512, 512),
    ]


def test_other_towers_are_refused_with_a_reason(backbones):
    bb = copy.copy(backbones["vit"])
    bb.model = SimpleNamespace(visual=torch.nn.Identity())  # stands in for a timm or Hugging Face tower
    with pytest.raises(ValueError, match=r"VisionTransformer or ModifiedResNet.*Identity"):
        bb.lora_targets()
    with pytest.raises(ValueError, match="at least 1"):
        backbones["vit"].lora_targets(0)


@pytest.mark.parametrize(("name", "n_blocks"), CASES, ids=IDS)
def test_zero_delta_reproduces_encode_image(backbones, name, n_blocks):
    bb = backbones[name]
    targets = bb.lora_targets(n_blocks)
    x = images(bb, 4)
    prefix = bb.vision_prefix(x, targets)  # [N, T, W] or [N, C, h, w]
    assert not prefix.requires_grad and not prefix.is_inference()
    feats = bb.vision_suffix(prefix, factors(targets, seed=0))  # [N, D]
    assert feats.shape == (4, bb.embed_dim) and feats.dtype == torch.float32
    torch.testing.assert_close(feats, encode(bb, bb.model, x), atol=ATOL, rtol=0)
    torch.testing.assert_close(feats, bb.encode_images(x), atol=ATOL, rtol=0)


@pytest.mark.parametrize(("name", "n_blocks"), CASES, ids=IDS)
def test_low_rank_delta_equals_merged_weights(backbones, name, n_blocks):
    bb = backbones[name]
    targets = bb.lora_targets(n_blocks)
    x = images(bb, 4, seed=1)
    lora = factors(targets, seed=3, b_scale=0.2)
    feats = bb.vision_suffix(bb.vision_prefix(x, targets), lora)  # [N, D]
    torch.testing.assert_close(feats, merged_reference(bb, lora, x), atol=ATOL, rtol=0)
    # The delta is large enough for the comparison to mean something.
    assert (feats - encode(bb, bb.model, x)).abs().max() > 1e-2


@pytest.mark.parametrize("name", ["vit", "resnet"])
def test_gradients_reach_the_factors_and_no_model_parameter(backbones, name):
    bb = backbones[name]
    before = state(bb)
    targets = bb.lora_targets()
    prefix = bb.vision_prefix(images(bb, 3))
    text = F.normalize(torch.randn(5, bb.embed_dim, generator=torch.Generator().manual_seed(0)), dim=-1)  # [C, D]
    fresh, moved = factors(targets, seed=0), factors(targets, seed=1, b_scale=0.2)
    with torch.enable_grad():
        for lora in (fresh, moved):
            logits = 20 * bb.vision_suffix(prefix, lora) @ text.T  # [N, C]
            (-(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1).mean()).backward()
    # At TTL's init (B = 0) only B gets a gradient, as in PEFT; once B moves, A does too.
    assert all(a.grad is not None and torch.count_nonzero(a.grad) == 0 for a in fresh.a)
    for t in [*fresh.b, *moved.a, *moved.b]:
        assert t.grad is not None and bool(torch.isfinite(t.grad).all()) and t.grad.abs().sum() > 0
    assert all(not p.requires_grad and p.grad is None for p in bb.model.parameters())
    after = bb.model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize(("name", "n_blocks"), [("vit", 1), ("vit-ls-avg", 2), ("resnet", 3)])
def test_stacked_requests_equal_separate_calls_values_and_gradients(backbones, name, n_blocks):
    bb = backbones[name]
    targets = bb.lora_targets(n_blocks)
    text = F.normalize(torch.randn(5, bb.embed_dim, generator=torch.Generator().manual_seed(0)), dim=-1)  # [C, D]
    prefixes = [bb.vision_prefix(images(bb, 3, seed=10 + r), targets) for r in range(3)]
    alone_req, stack_req = ([factors(targets, seed=20 + r, b_scale=0.2) for r in range(3)] for _ in range(2))

    def loss(feats: torch.Tensor) -> torch.Tensor:  # summed over requests: each gets its own gradient
        logits = 20 * feats @ text.T  # [..., N, C]
        return -(logits.softmax(-1) * logits.log_softmax(-1)).sum()

    with torch.enable_grad():
        stacked = bb.vision_suffix(torch.stack(prefixes), LoraFactors.stack(stack_req))  # [R, N, D]
        loss(stacked).backward()
        assert stacked.shape == (3, 3, bb.embed_dim)
        for r in range(3):
            alone = bb.vision_suffix(prefixes[r], alone_req[r])  # [N, D]
            loss(alone).backward()
            torch.testing.assert_close(stacked[r], alone, atol=STACK_ATOL, rtol=0)
            for s, a in zip(stack_req[r].parameters(), alone_req[r].parameters(), strict=True):
                torch.testing.assert_close(s.grad, a.grad, atol=STACK_GRAD_ATOL, rtol=1e-5)


def test_same_seed_same_init(backbones):
    targets = backbones["vit"].lora_targets()
    one, two, other = factors(targets, 7), factors(targets, 7), factors(targets, 8)
    assert one.rank == 16 and one.scaling == 2.0 and len(one.a) == len(targets) == 4
    assert all(torch.equal(a, b) for a, b in zip(one.a, two.a, strict=True))
    assert not any(torch.equal(a, b) for a, b in zip(one.a, other.a, strict=True))
    assert all(torch.count_nonzero(b) == 0 and b.shape == (64, 16) for b in one.b)
    assert all(t.requires_grad and t.is_leaf and t.dtype == torch.float32 for t in one.parameters())
    # A is xavier-normal ([r, in]: fans 64 and 16), drawn target by target from the request's generator.
    expected = torch.nn.init.xavier_normal_(torch.empty(16, 64), generator=torch.Generator().manual_seed(7))
    assert torch.equal(one.a[0], expected)
    assert abs(float(torch.cat([a.detach().flatten() for a in one.a]).std()) - (2 / (64 + 16)) ** 0.5) < 0.02


def test_mismatched_shapes_are_refused(backbones):
    bb = backbones["vit"]
    targets = bb.lora_targets()
    lora = factors(targets, 0)
    with pytest.raises(ValueError, match="expected"):
        LoraFactors(targets, lora.a, (lora.b[0][:, :8], *lora.b[1:]))
    prefix = bb.vision_prefix(images(bb, 2), targets)  # [N, T, W]
    with pytest.raises(ValueError, match="prefix"):
        bb.vision_suffix(prefix, LoraFactors.stack([lora, lora]))  # stacked factors need [R, N, T, W]


def test_prefix_built_inside_inference_mode_still_trains(backbones):
    bb = backbones["vit"]
    with torch.inference_mode():
        prefix = bb.vision_prefix(images(bb, 2))
    lora = factors(bb.lora_targets(), 0)
    with torch.enable_grad():
        bb.vision_suffix(prefix, lora).sum().backward()
    assert all(b.grad is not None for b in lora.b)


def test_block_with_a_causal_mask_matches_open_clip(backbones):
    # Vision towers pass no mask; the text tower's causal blocks check the masked path of lora_block.
    model = backbones["vit"].model
    x = torch.randn(2, 8, 64, generator=torch.Generator().manual_seed(0))  # [N, T, W]
    mask = model.attn_mask[:8, :8]  # [T, T] additive causal mask
    for blk in model.transformer.resblocks:
        with torch.no_grad():
            torch.testing.assert_close(
                lora_block(blk, x, 1, None, None, 2.0, attn_mask=mask), blk(x, attn_mask=mask), atol=ATOL, rtol=0
            )
