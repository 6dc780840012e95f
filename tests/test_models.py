"""pipeline.lm.models, offline: every source kind, revisions, the not-cached error, counts.

The hub path is exercised against a hand-built hub-style cache
(models--org--name/{refs,snapshots}) with HF_HUB_OFFLINE=1, which is exactly what
`hf download ... --cache-dir` leaves behind.
"""

from __future__ import annotations

import json
import shutil
import socket
from pathlib import Path

import pytest
import torch
from helpers import is_cached

from pipeline.core.config import ConfigError, SuiteConfig
from pipeline.core.errors import QuantaError
from pipeline.lm import models
from pipeline.lm.models import ModelSpec

FAKE_COMMIT = "0123456789abcdef0123456789abcdef01234567"


def hub_cache(cache: Path, repo_id: str, revision: str, files_from: Path, commit: str = FAKE_COMMIT) -> Path:
    """Lay out `files_from` as `hf download repo_id --revision revision --cache-dir cache` would."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / revision).write_text(commit)
    snap = repo / "snapshots" / commit
    if not snap.exists():
        shutil.copytree(files_from, snap)
    return snap


@pytest.fixture
def no_network(monkeypatch):
    """Fail fast (instead of retrying for ~25 s) if anything tries to reach a host."""

    def refuse(*args, **kwargs):
        raise OSError("network access in a test")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)


def logits(model, ids=(1, 5, 9, 42, 7, 3)) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([list(ids)])).logits  # (batch, pos, vocab)


# --------------------------------------------------------------------------- Pythia names


def test_pythia_revisions():
    revs = models.pythia_revisions()
    assert len(revs) == 154 == len(set(revs))
    assert revs[:12] == ["step0", "step1", "step2", "step4", "step8", "step16", "step32", "step64", "step128",
                         "step256", "step512", "step1000"]
    assert revs[-1] == "step143000"
    steps = [int(r[4:]) for r in revs]
    assert steps == sorted(steps)


def test_pythia_models():
    for size in ("70m", "160m", "410m", "1b", "1.4b", "2.8b", "6.9b", "12b", "14m"):
        assert models.PYTHIA_MODELS[f"pythia-{size}"] == f"EleutherAI/pythia-{size}"
    assert models.PYTHIA_MODELS["pythia-70m-deduped"] == "EleutherAI/pythia-70m-deduped"


# --------------------------------------------------------------------------- specs


def test_spec_from_suite():
    suite = SuiteConfig(
        models=("pythia-70m", "mine", "gg"),
        revisions=("step1000", "step2000"),
        sources={"mine": "some/dir/model", "gg": "org/repo-gguf"},
        gguf_files={"gg": "model-Q8_0.gguf"},
    )
    assert models.spec_from_suite(suite, "pythia-70m", "step1000") == ModelSpec(
        "pythia-70m", "EleutherAI/pythia-70m", "step1000"
    )
    assert models.spec_from_suite(suite, "mine").revision == "step2000"  # default: the last
    assert models.spec_from_suite(suite, "gg", "main").gguf_file == "model-Q8_0.gguf"
    with pytest.raises(ConfigError, match="unknown model 'nope'; suite.models: pythia-70m, mine, gg"):
        models.spec_from_suite(suite, "nope", "main")
    with pytest.raises(ConfigError, match=r"add suite.sources.x"):
        models.spec_from_suite(SuiteConfig(models=("x",)), "x", "main")


def test_suite_config_rejects_unsafe_names():
    with pytest.raises(ConfigError, match="listed twice"):
        SuiteConfig(models=("a", "a"))
    with pytest.raises(ConfigError, match="cannot be used in a path"):
        SuiteConfig(models=("EleutherAI/pythia-70m",))


# --------------------------------------------------------------------------- local sources


def test_load_local_dir(tiny_neox_dir):
    spec = ModelSpec("tiny", str(tiny_neox_dir))
    assert models.source_kind(spec) == "local"
    model = models.load_model(spec, device="cpu")
    assert not model.training and model.dtype == torch.float32 and model.device.type == "cpu"
    assert logits(model).shape == (1, 6, 320)
    assert models.max_context(model) == 256
    tok = models.load_tokenizer(spec)
    assert len(tok) == 300 and tok("the quick", add_special_tokens=False)["input_ids"]
    with pytest.raises(models.UnknownRevisionError, match="its only revision is 'main', not 'step5'"):
        models.load_model(ModelSpec("tiny", str(tiny_neox_dir), "step5"))


def test_load_dtype(tiny_neox_dir):
    model = models.load_model(ModelSpec("tiny", str(tiny_neox_dir)), dtype="bfloat16", device="cpu")
    assert model.dtype == torch.bfloat16


def test_local_revisions(tiny_revisions_dir):
    specs = {r: ModelSpec("tiny", str(tiny_revisions_dir), r) for r in ("step1", "step2")}
    assert models.source_kind(specs["step1"]) == "local_revisions"
    a, b = (models.load_model(s, device="cpu") for s in specs.values())
    # the revision picks the sub-directory: different weights
    assert not torch.equal(a.gpt_neox.embed_in.weight, b.gpt_neox.embed_in.weight)
    assert len(models.load_tokenizer(specs["step2"])) == 300
    with pytest.raises(models.UnknownRevisionError) as e:
        models.load_model(ModelSpec("tiny", str(tiny_revisions_dir), "step3"))
    assert "no revision 'step3'" in str(e.value) and "it has step1, step2" in str(e.value)


def test_local_revisions_tokenizer_at_top(tmp_path, tiny_revisions_dir):
    # a suite may keep one tokenizer at the top instead of one per revision
    root = tmp_path / "suite"
    shutil.copytree(tiny_revisions_dir, root)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.move(root / "step1" / f, root / f)
        (root / "step2" / f).unlink()
    assert len(models.load_tokenizer(ModelSpec("t", str(root), "step2"))) == 300


def test_missing_local_source(tmp_path, no_network, monkeypatch):
    with pytest.raises(models.ModelError, match="no such file or folder"):
        models.load_model(ModelSpec("m", str(tmp_path / "nope" / "model")))
    # `models/x` has the form of a hub id, but no hub has an organisation "models": it is a
    # local folder that is not there, said so before any network attempt
    monkeypatch.chdir(tmp_path)
    with pytest.raises(models.ModelError, match=r"^suite.sources\['m'\] = 'models/x': no such file or folder; "):
        models.load_tokenizer(ModelSpec("m", "models/x"), local_files_only=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(models.ModelError, match="no config.json"):
        models.load_model(ModelSpec("m", str(tmp_path / "empty")))


def test_tiny_llama_tied(tmp_path, tiny_tokenizer_dir):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=True)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path)
    model = models.load_model(ModelSpec("llama", str(tmp_path)), device="cpu")
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert models.max_context(model) == 128
    d, ff, kv, V, L = 32, 64, 2 * 8, 300, 2  # kv = kv_heads * head_dim
    per_layer = d * d + 2 * d * kv + d * d + 3 * d * ff + 2 * d  # q, k+v, o, gate/up/down, 2 norms
    non_emb = L * per_layer + d  # + final norm
    assert models.param_counts(model) == {"total": non_emb + V * d, "non_embedding": non_emb}


# --------------------------------------------------------------------------- parameter counts


def test_param_counts_neox_by_hand(tiny_neox_dir):
    model = models.load_model(ModelSpec("tiny", str(tiny_neox_dir)), device="cpu")
    d, L, V = 32, 2, 320
    # per layer: 2 layernorms (4d), qkv (3d^2 + 3d), dense (d^2 + d), h->4h (4d^2 + 4d), 4h->h (4d^2 + d)
    non_emb = L * (12 * d * d + 13 * d) + 2 * d  # + final layernorm
    assert models.param_counts(model) == {"total": non_emb + 2 * V * d, "non_embedding": non_emb}


def test_param_counts_pythia70m_published():
    """Pythia's own table: 70,426,624 total and 18,915,328 non-embedding parameters."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    cfg = GPTNeoXConfig(vocab_size=50304, hidden_size=512, num_hidden_layers=6, num_attention_heads=8,
                        intermediate_size=2048, max_position_embeddings=2048, rotary_pct=0.25)
    with torch.device("meta"):
        model = GPTNeoXForCausalLM(cfg)
    assert models.param_counts(model) == {"total": 70_426_624, "non_embedding": 18_915_328}


def test_config_param_counts_and_is_cached(tiny_neox_dir, tmp_path):
    spec = ModelSpec("tiny", str(tiny_neox_dir))
    assert models.config_param_counts(spec)["non_embedding"] == 2 * (12 * 32 * 32 + 13 * 32) + 64
    assert is_cached(spec)
    missing = ModelSpec("p", "EleutherAI/pythia-70m", "step3000")
    assert not is_cached(missing, cache_dir=str(tmp_path))
    assert models.config_param_counts(missing, cache_dir=str(tmp_path)) is None


def test_max_context_unknown():
    class Cfg:
        pass

    with pytest.raises(models.ModelError, match="context length"):
        models.max_context(Cfg())


# --------------------------------------------------------------------------- hub ids, offline


def test_hub_cache_offline(tmp_path, tiny_neox_dir, no_network):
    cache = tmp_path / "hf"
    hub_cache(cache, "EleutherAI/pythia-70m", "step1000", tiny_neox_dir)
    spec = ModelSpec("pythia-70m", "EleutherAI/pythia-70m", "step1000")
    assert models.source_kind(spec) == "hub"
    assert is_cached(spec, cache_dir=str(cache))
    model = models.load_model(spec, cache_dir=str(cache), device="cpu")
    ref = models.load_model(ModelSpec("t", str(tiny_neox_dir)), device="cpu")
    assert torch.equal(logits(model), logits(ref))
    assert len(models.load_tokenizer(spec, cache_dir=str(cache))) == 300
    assert models.max_context(models.load_config(spec, cache_dir=str(cache))) == 256
    assert models.download(spec, cache_dir=str(cache)).name == FAKE_COMMIT  # offline: the cached snapshot


def test_not_cached_error(tmp_path, tiny_neox_dir, no_network):
    cache = tmp_path / "hf"
    hub_cache(cache, "EleutherAI/pythia-160m", "step1000", tiny_neox_dir)
    spec = ModelSpec("pythia-160m", "EleutherAI/pythia-160m", "step3000")
    with pytest.raises(models.ModelNotAvailableError) as e:
        models.load_model(spec, cache_dir=str(cache))
    msg = str(e.value)
    assert "\n" not in msg
    assert "EleutherAI/pythia-160m at revision step3000" in msg and "HF_HUB_OFFLINE=1" in msg
    assert msg.endswith(f"hf download EleutherAI/pythia-160m --revision step3000 --cache-dir {cache}")
    with pytest.raises(models.ModelNotAvailableError, match="hf download EleutherAI/pythia-160m"):
        models.load_tokenizer(spec, cache_dir=str(cache))
    with pytest.raises(models.ModelNotAvailableError, match="with HF_HUB_OFFLINE=1"):
        models.download(spec, cache_dir=str(cache))
    # config cached, weights not (an interrupted download): the same fix
    snap = hub_cache(cache, "EleutherAI/pythia-160m", "step5000", tiny_neox_dir, commit="f" * 40)
    (snap / "model.safetensors").unlink()
    with pytest.raises(models.ModelNotAvailableError, match="only partly in the cache .*hf download EleutherAI"):
        models.load_model(ModelSpec("p", "EleutherAI/pythia-160m", "step5000"), cache_dir=str(cache))


def test_local_files_only_without_offline_env(tmp_path, monkeypatch, no_network):
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    assert not models.hub_offline()
    spec = ModelSpec("pythia-70m", "EleutherAI/pythia-70m", "step3000")
    with pytest.raises(models.ModelNotAvailableError, match="local_files_only is set"):
        models.load_model(spec, cache_dir=str(tmp_path), local_files_only=True)


def test_offline_env_set_after_import(tmp_path, monkeypatch, no_network):
    """huggingface_hub reads HF_HUB_OFFLINE at import; quanta reads it again at call time."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(models.ModelNotAvailableError, match="HF_HUB_OFFLINE=1"):
        models.load_config(ModelSpec("p", "EleutherAI/pythia-410m", "main"), cache_dir=str(tmp_path))


def test_unknown_pythia_revision(tmp_path):
    spec = ModelSpec("pythia-70m", "EleutherAI/pythia-70m", "step1234")
    with pytest.raises(models.UnknownRevisionError) as e:
        models.load_model(spec, cache_dir=str(tmp_path))
    msg = str(e.value)
    assert "no revision 'step1234'" in msg
    assert "step0, step1, step2, step4, ..., step142000, step143000 (154 in all)" in msg
    # main and commit hashes are valid names; not being cached is then the problem
    for rev in ("main", FAKE_COMMIT):
        with pytest.raises(models.ModelNotAvailableError):
            models.load_model(ModelSpec("p", "EleutherAI/pythia-70m", rev), cache_dir=str(tmp_path))


# --------------------------------------------------------------------------- device and dtype


def test_resolve_device_dtype_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert models.resolve_device("auto") == torch.device("cpu")
    assert models.resolve_dtype("auto", "auto") == torch.float32
    assert models.resolve_dtype("float16", "cpu") == torch.float16
    assert models.resolve_dtype(torch.bfloat16, "cpu") == torch.bfloat16
    assert models.resolve_device(torch.device("cpu")) == torch.device("cpu")
    with pytest.raises(ConfigError, match="no CUDA device") as e:
        models.resolve_device("cuda")
    assert "\n" not in str(e.value) and str(e.value).startswith("suite.device is 'cuda'")  # one line, naming the key
    with pytest.raises(ConfigError, match="not a device"):
        models.resolve_device("gpu0")
    with pytest.raises(ConfigError, match="not one of auto"):
        models.resolve_dtype("fp8", "cpu")


def test_resolve_device_dtype_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert models.resolve_device("auto") == torch.device("cuda")
    assert models.resolve_dtype("auto", "auto") == torch.bfloat16
    assert models.resolve_dtype("auto", "cpu") == torch.float32
    assert models.resolve_device("cuda:1") == torch.device("cuda:1")
    with pytest.raises(ConfigError, match="there are 2 CUDA devices"):
        models.resolve_device("cuda:2")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert models.resolve_dtype("auto", "cuda") == torch.float32


# --------------------------------------------------------------------------- GGUF


def _permute_for_gguf(w, n_head):
    # llama.cpp's convert_hf_to_gguf stores q/k rows interleaved for its rope kernel;
    # transformers undoes exactly this on load
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_llama_gguf(path: Path, model, tokenizer) -> Path:
    """Write a Llama model and its byte-level BPE tokenizer as an F32 GGUF file, with the
    tensor names and q/k layout that llama.cpp's converter produces."""
    gguf = pytest.importorskip("gguf")
    cfg = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(10000.0)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_vocab_size(cfg.vocab_size)
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    tokens = [None] * len(tokenizer)
    for tok, i in spec["model"]["vocab"].items():
        tokens[i] = tok
    specials = {a["id"] for a in spec["added_tokens"]}
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([3 if i in specials else 1 for i in range(len(tokens))])  # 3 = control
    w.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in spec["model"]["merges"]])
    w.add_bos_token_id(0)
    w.add_eos_token_id(0)
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        w.add_tensor(f"blk.{i}.attn_norm.weight", sd[p + "input_layernorm.weight"])
        w.add_tensor(f"blk.{i}.attn_q.weight", _permute_for_gguf(sd[p + "self_attn.q_proj.weight"], cfg.num_attention_heads))
        w.add_tensor(f"blk.{i}.attn_k.weight", _permute_for_gguf(sd[p + "self_attn.k_proj.weight"], cfg.num_key_value_heads))
        w.add_tensor(f"blk.{i}.attn_v.weight", sd[p + "self_attn.v_proj.weight"])
        w.add_tensor(f"blk.{i}.attn_output.weight", sd[p + "self_attn.o_proj.weight"])
        w.add_tensor(f"blk.{i}.ffn_norm.weight", sd[p + "post_attention_layernorm.weight"])
        w.add_tensor(f"blk.{i}.ffn_gate.weight", sd[p + "mlp.gate_proj.weight"])
        w.add_tensor(f"blk.{i}.ffn_up.weight", sd[p + "mlp.up_proj.weight"])
        w.add_tensor(f"blk.{i}.ffn_down.weight", sd[p + "mlp.down_proj.weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    w.add_tensor("output.weight", sd["lm_head.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def tiny_llama_gguf(tmp_path_factory, tiny_tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=len(tiny_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=False, rms_norm_eps=1e-6, rope_theta=10000.0)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    path = write_llama_gguf(tmp_path_factory.mktemp("gguf") / "tiny-llama-F32.gguf", model, tiny_tokenizer)
    return path, model


def test_gguf_needs_accelerate(tiny_llama_gguf, monkeypatch):
    import transformers.utils

    monkeypatch.setattr(transformers.utils, "is_accelerate_available", lambda *a, **k: False)
    with pytest.raises(models.ModelError, match="pip install accelerate"):
        models.load_model(ModelSpec("g", str(tiny_llama_gguf[0])))


def test_gguf_local(tiny_llama_gguf, tiny_tokenizer):
    pytest.importorskip("accelerate", reason="transformers reads GGUF only with accelerate installed")
    path, ref = tiny_llama_gguf
    spec = ModelSpec("g", str(path))
    assert models.source_kind(spec) == "gguf"
    model = models.load_model(spec, device="cpu")
    assert type(model).__name__ == "LlamaForCausalLM" and models.max_context(model) == 128
    assert torch.allclose(logits(model), logits(ref), atol=1e-5)
    assert models.param_counts(model) == models.param_counts(ref)
    tok = models.load_tokenizer(spec)
    text = "The quick brown fox, naïve café"
    assert tok(text, add_special_tokens=False)["input_ids"] == tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
    with pytest.raises(models.UnknownRevisionError):
        models.load_model(ModelSpec("g", str(path), "step1"))


def test_gguf_hub_cache_offline(tiny_llama_gguf, tmp_path, no_network):
    pytest.importorskip("accelerate", reason="transformers reads GGUF only with accelerate installed")
    path, ref = tiny_llama_gguf
    files = tmp_path / "files"
    files.mkdir()
    shutil.copy(path, files / path.name)
    cache = tmp_path / "hf"
    hub_cache(cache, "someorg/tiny-llama-GGUF", "main", files)
    spec = ModelSpec("g", "someorg/tiny-llama-GGUF", "main", gguf_file=path.name)
    assert models.source_kind(spec) == "hub"
    model = models.load_model(spec, cache_dir=str(cache), device="cpu")
    assert torch.allclose(logits(model), logits(ref), atol=1e-5)
    missing = ModelSpec("g", "someorg/tiny-llama-GGUF", "main", gguf_file="tiny-llama-Q4_K_M.gguf")
    with pytest.raises(models.ModelNotAvailableError) as e:
        models.load_model(missing, cache_dir=str(cache))
    assert str(e.value).endswith(
        f"hf download someorg/tiny-llama-GGUF tiny-llama-Q4_K_M.gguf --revision main --cache-dir {cache}"
    )


def test_errors_are_quanta_errors():
    for cls in (models.ModelError, models.ModelNotAvailableError, models.UnknownRevisionError):
        assert issubclass(cls, QuantaError)
