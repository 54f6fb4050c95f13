"""Model resolution, loading from every source we can reach offline, and the text-feature cache."""

from __future__ import annotations

import json

import open_clip
import pytest
import torch
from safetensors.torch import save_file

from server.clip import load_backbone, resolve_device, resolve_model
from server.clip import spec as spec_module
from server.clip.cache import ByteLRU, key_bytes, tensor_bytes
from server.clip.spec import cuda_unavailable_reason
from server.engine.classes import ClassFeatures
from server.errors import ConfigError
from server.settings import Settings
from tests.support.model import TINY_CONFIG


def make_settings(**kw) -> Settings:
    return Settings(device="cpu", _env_file=None, **kw)


def test_missing_demo_model_fails_fast_naming_the_setting(monkeypatch, tmp_path):
    monkeypatch.setattr(spec_module, "DEMO_MODEL_DIR", tmp_path / "absent")
    with pytest.raises(ConfigError, match="TTA_MODEL"):
        resolve_model(make_settings())


def test_shipped_demo_model_is_the_default_when_present(monkeypatch, tiny_model_dir):
    monkeypatch.setattr(spec_module, "DEMO_MODEL_DIR", tiny_model_dir)
    spec = resolve_model(make_settings())
    assert spec.display == "demo" and spec.name == f"local-dir:{tiny_model_dir}"


@pytest.mark.parametrize(
    ("kw", "words"),
    [
        ({"model": "ViT-Nonexistent-99"}, ["TTA_MODEL", "list_models"]),
        ({"model": "local-dir:/no/such/dir"}, ["TTA_MODEL", "no such directory"]),
        ({"model": "ViT-B-32", "pretrained": "no-such-tag"}, ["TTA_PRETRAINED", "openai"]),
    ],
)
def test_bad_model_settings_name_the_setting(kw, words):
    with pytest.raises(ConfigError) as info:
        resolve_model(make_settings(**kw))
    for word in words:
        assert word in str(info.value)


def test_local_dir_without_config_is_explained(tmp_path):
    with pytest.raises(ConfigError, match=r"open_clip_config\.json"):
        resolve_model(make_settings(model=f"local-dir:{tmp_path}"))


def test_offline_download_failure_names_local_dir(monkeypatch):
    def offline(*args, **kwargs):
        raise RuntimeError("Failed to download weights for tag 'openai': Connection refused")

    monkeypatch.setattr(open_clip, "create_model", offline)
    with pytest.raises(ConfigError) as info:
        load_backbone(make_settings(model="ViT-B-32", pretrained="openai"))
    assert "offline" in str(info.value) and "local-dir:" in str(info.value)


def test_cuda_device_without_cuda_is_a_config_error():
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    with pytest.raises(ConfigError, match="CUDA") as info:
        resolve_device("cuda:0")
    # The reason, as the log of TTA_DEVICE=auto gives it: no driver, a driver too old (naming the one needed).
    reason = cuda_unavailable_reason()
    assert reason is not None and reason in str(info.value)
    if torch.version.cuda is not None:
        assert f"built for CUDA {torch.version.cuda}, which needs an NVIDIA driver >=" in reason
    assert resolve_device("auto").type == "cpu"


def test_fp16_on_cpu_is_refused(tiny_model_dir):
    with pytest.raises(ConfigError, match="fp16"):
        load_backbone(make_settings(model=f"local-dir:{tiny_model_dir}", precision="fp16"))


def assert_same_model(original, loaded, tokenizer) -> None:
    """Bit-identical weights, and the same outputs (kernels may differ in the last ulp between modules)."""
    a_state, b_state = original.state_dict(), loaded.model.state_dict()
    assert a_state.keys() == b_state.keys()
    assert all(torch.equal(a_state[k], b_state[k]) for k in a_state)
    for a, b in zip(_outputs(original, tokenizer), _outputs(loaded.model, loaded.tokenizer), strict=True):
        assert torch.allclose(a, b, atol=1e-5, rtol=0), (a - b).abs().max()


def _outputs(model, tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(5)
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        return model.encode_image(images), model.encode_text(tokenizer(["a red square", "two blue dots"]))


def test_local_dir_save_and_reload_gives_identical_outputs(tmp_path):
    torch.manual_seed(11)
    original = open_clip.model.CLIP(**TINY_CONFIG).eval()
    folder = tmp_path / "saved"
    folder.mkdir()
    config = {"model_cfg": TINY_CONFIG, "preprocess_cfg": {"size": 32}}
    (folder / "open_clip_config.json").write_text(json.dumps(config))
    state = {k: v.contiguous() for k, v in original.state_dict().items()}
    save_file(state, str(folder / "open_clip_model.safetensors"))
    loaded = load_backbone(make_settings(model=f"local-dir:{folder}"))
    assert_same_model(original, loaded, open_clip.get_tokenizer("ViT-B-32", context_length=16))
    assert not loaded.model.training
    assert all(not p.requires_grad for p in loaded.model.parameters())


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_builtin_name_with_a_local_checkpoint_file(tmp_path, suffix):
    config_dir = tmp_path / "configs"
    config_dir.mkdir()
    (config_dir / "tta-tiny-test.json").write_text(json.dumps(TINY_CONFIG))
    open_clip.add_model_config(config_dir)
    torch.manual_seed(12)
    original = open_clip.create_model("tta-tiny-test").eval()
    checkpoint = tmp_path / f"weights{suffix}"
    state = {k: v.contiguous() for k, v in original.state_dict().items()}
    save_file(state, str(checkpoint)) if suffix == ".safetensors" else torch.save({"state_dict": state}, checkpoint)
    loaded = load_backbone(make_settings(model="tta-tiny-test", pretrained=str(checkpoint)))
    assert loaded.spec.pretrained == str(checkpoint.resolve())
    assert_same_model(original, loaded, loaded.tokenizer)


def test_class_features_are_cached_and_ensembled(tiny_model_dir):
    bb = load_backbone(make_settings(model=f"local-dir:{tiny_model_dir}"))
    classes = ClassFeatures(bb, 2**20)
    templates = ("a {}.", "art of {}.")
    feats = classes.get(("cat", "dog"), templates)
    assert feats.shape == (2, 32)
    assert torch.allclose(feats.norm(dim=-1), torch.ones(2), atol=1e-6)
    per_template = bb.encode_prompts(["a cat.", "art of cat."])
    expected = torch.nn.functional.normalize(per_template.mean(0), dim=-1)
    assert torch.allclose(feats[0], expected, atol=1e-6)
    assert classes.get(("cat", "dog"), templates) is feats  # served from the cache
    key = ("classes", ("cat", "dog"), templates, None, 0.0)
    assert classes.bytes == feats.numel() * 4 + key_bytes(key)  # the key counts: its labels and templates


def test_text_cache_is_bounded_in_bytes_and_evicts_least_recently_used():
    entry = 400 + key_bytes(("a",))  # every key here is as large
    cache = ByteLRU(3 * entry, tensor_bytes)
    tensors = {k: torch.zeros(10, 10) for k in "abcd"}  # 400 bytes each
    for key in "abc":
        cache.put((key,), tensors[key])
    assert cache.get(("a",)) is not None  # a is now the most recently used
    cache.put(("d",), tensors["d"])
    assert cache.get(("b",)) is None and cache.get(("a",)) is not None
    assert cache.bytes == 3 * entry and len(cache) == 3
    cache.put(("huge",), torch.zeros(1000))  # larger than the budget: not kept, nothing evicted
    assert cache.get(("huge",)) is None and len(cache) == 3
