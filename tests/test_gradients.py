"""Per-target gradients: the batched path against a plain loop of single backward passes
(one forward + backward per target on its own truncated context), for every layer rule
(Linear, LayerNorm, GPT-2's Conv1D) and the generic route; the projected cosines against
the exact ones at the default k; invariances (batch composition, context sharing,
determinism); parameter selection; bad samples (zero, NaN) and bad input."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import torch
from helpers import devices

from pipeline.core import config as config_lib
from pipeline.core.config import ConfigError
from pipeline.core.resources import Peak, resident_bytes
from pipeline.lm import models
from pipeline.qdg import gradients, memory_plan, per_sample
from pipeline.qdg.gradients import BadGradientWarning, GradientError, GradientsConfig, compute_gradients, select_params

VOCAB = 320  # tiny_neox_dir's model vocabulary (conftest.MODEL_VOCAB)
EXACT = GradientsConfig(projection="none")


# --------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Tiny matmuls gain nothing from a second thread, and on a shared, busy machine
    # OpenMP threads that wait for each other made these tests 10-40x slower.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model(tiny_neox_dir):
    return models.load_model(models.ModelSpec(name="tiny", source=str(tiny_neox_dir)), dtype="float32", device="cpu")


def random_docs(n: int, lo: int, hi: int, seed: int = 0, avoid: int = 7) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(seed)
    docs = {}
    for i in range(n):
        t = rng.integers(0, VOCAB, size=int(rng.integers(lo, hi + 1)))
        t[t == avoid] = avoid + 1  # token `avoid` is kept for the NaN test
        docs[10 * i + 3] = t
    return docs


def random_samples(docs: dict[int, np.ndarray], n: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    ids = np.array(list(docs))
    doc_ids = rng.choice(ids, size=n)
    pos = np.array([rng.integers(1, len(docs[d])) for d in doc_ids])
    return {"doc_id": doc_ids, "pos": pos}


def reference_gradient(model, params, tokens: np.ndarray, pos: int, max_len: int | None = None) -> np.ndarray:
    """The slow reference: the target's own context alone, model(...).logits, one backward."""
    start = 0 if max_len is None else max(0, pos - max_len + 1)
    ctx = torch.as_tensor(tokens[start:pos], dtype=torch.long)[None]
    logits = model(input_ids=ctx).logits[0, -1].float()  # (vocab,) predicts token pos
    loss = torch.nn.functional.cross_entropy(logits[None], torch.tensor([int(tokens[pos])]))
    grads = torch.autograd.grad(loss, [p for _, p in params], allow_unused=True)
    return torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for (_, p), g in zip(params, grads)]).numpy()


def reference_matrix(model, params, docs, samples, max_len=None) -> np.ndarray:
    return np.stack(
        [reference_gradient(model, params, docs[int(d)], int(p), max_len) for d, p in zip(samples["doc_id"], samples["pos"])]
    )


def max_rel_error(ours: np.ndarray, ref: np.ndarray) -> float:
    return float(np.max(np.linalg.norm(ours - ref, axis=1) / np.linalg.norm(ref, axis=1)))


def cosines(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    return (x @ x.T)[np.triu_indices(len(x), 1)]


# --------------------------------------------------------------------------- exactness


@pytest.mark.parametrize(
    "share,batch_tokens,batch_rows",
    [("auto", 8192, 32), ("always", 300, 4), ("never", 64, 3)],
)
def test_batched_matches_single_backward_loop(model, share, batch_tokens, batch_rows):
    docs = random_docs(12, 5, 90)
    samples = random_samples(docs, 40, seed=1)
    # several targets of one document, close together: shared rows under auto
    samples["doc_id"] = np.concatenate([samples["doc_id"], [3, 3, 3, 3]])
    samples["pos"] = np.concatenate([samples["pos"], [1, 30, 34, 4]])
    params = select_params(model)
    cfg = dataclasses.replace(EXACT, share_context=share, batch_tokens=batch_tokens, batch_rows=batch_rows)
    res = compute_gradients(model, samples, docs, cfg)
    ref = reference_matrix(model, params, docs, samples)
    err = max_rel_error(res.grads, ref)
    print(f"share={share}: max relative error {err:.2e}")
    assert err <= 1e-5
    assert not res.bad.any()
    np.testing.assert_allclose(res.norms, np.linalg.norm(ref, axis=1), rtol=1e-5)


def test_per_target_gradients_one_document_many_targets(model):
    # The shape: one forward of the document, per-target backward passes.
    tokens = random_docs(1, 80, 80, seed=5)[3]
    targets = torch.tensor([79, 1, 40, 41, 77, 60, 2])
    params = select_params(model)
    ours, norms = gradients.per_target_gradients(model, params, torch.as_tensor(tokens), targets)
    assert ours.shape == (7, sum(p.numel() for _, p in params))
    ref = np.stack([reference_gradient(model, params, tokens, int(t)) for t in targets])
    assert max_rel_error(ours.numpy(), ref) <= 1e-5
    np.testing.assert_allclose(norms.numpy(), np.linalg.norm(ref, axis=1), rtol=1e-5)


def test_layernorm_rule_and_generic_route_are_exact(model):
    # LayerNorm has a rule; the input embedding has none and takes the generic route.
    docs = random_docs(4, 5, 40, seed=2)
    samples = random_samples(docs, 8, seed=2)
    params = select_params(model, include=["@norms", r"embed_in\."], exclude=[])
    assert any("layernorm" in n for n, _ in params) and any("embed_in" in n for n, _ in params)
    cfg = dataclasses.replace(EXACT, include=("@norms", r"embed_in\."), exclude=())
    with pytest.warns(UserWarning, match=r"embed_in\.weight\) have no per-layer rule"):
        res = compute_gradients(model, samples, docs, cfg)
    assert max_rel_error(res.grads, reference_matrix(model, params, docs, samples)) <= 1e-5


def test_gpt2_conv1d_rule_is_exact():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=16, n_layer=2, n_head=2,
                                      bos_token_id=0, eos_token_id=0)).eval()
    params = select_params(gpt2)
    names = [n for n, _ in params]
    assert all(("attn" in n or "mlp" in n) for n in names), names  # no wte, wpe, ln_*, tied lm_head
    docs = random_docs(4, 5, 40, seed=3)
    samples = random_samples(docs, 10, seed=3)
    res = compute_gradients(gpt2, samples, docs, EXACT)
    assert max_rel_error(res.grads, reference_matrix(gpt2, params, docs, samples)) <= 1e-5


def test_self_check_catches_a_layer_output_it_cannot_explain(model):
    # A hook that rescales a layer's output breaks the Linear rule's assumption
    # (output = x W^T + b); the first-batch check must refuse rather than be wrong.
    m = copy.deepcopy(model)
    m.gpt_neox.layers[0].mlp.dense_h_to_4h.register_forward_hook(lambda mod, args, out: out * 2)
    docs = random_docs(3, 10, 20)
    with pytest.raises(GradientError, match="dense_h_to_4h.weight.*do not add up"):
        compute_gradients(m, random_samples(docs, 4), docs, EXACT)


# --------------------------------------------------------------------------- each device (bench/gpu_check.py runs the cuda ones)


@pytest.mark.parametrize("device", devices())
def test_gradients_on_each_device_match_the_cpu_single_backward_loop(model, tiny_neox_dir, device):
    """Exact gradients on `device` (fp32, the stage's dtype) equal the CPU reference loop, and the
    sjlt projection there equals the CPU's: its tables are the same on every device."""
    docs = random_docs(12, 5, 90, seed=6)
    samples = random_samples(docs, 40, seed=6)
    on_device = models.load_model(models.ModelSpec(name="tiny", source=str(tiny_neox_dir)), dtype="float32", device=device)
    exact = compute_gradients(on_device, samples, docs, EXACT)
    assert max_rel_error(exact.grads, reference_matrix(model, select_params(model), docs, samples)) <= 1e-4
    projected = compute_gradients(on_device, samples, docs, GradientsConfig())
    assert max_rel_error(projected.grads, compute_gradients(model, samples, docs, GradientsConfig()).grads) <= 1e-4
    assert not exact.bad.any() and not projected.bad.any()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_peak_allocated_memory_stays_under_memory_gb(tiny_neox_dir):
    """On CUDA, gradients.memory_gb bounds the device memory torch allocates, the model's included,
    and changes batches, not gradients."""
    docs = random_docs(12, 5, 90, seed=7)
    samples = random_samples(docs, 60, seed=7)
    cuda = models.load_model(models.ModelSpec(name="tiny", source=str(tiny_neox_dir)), dtype="float32", device="cuda")
    free = compute_gradients(cuda, samples, docs, dataclasses.replace(EXACT, memory_gb=None))
    with Peak("cuda") as peak:
        bounded = compute_gradients(cuda, samples, docs, dataclasses.replace(EXACT, memory_gb=1.0))
    assert 0 < peak.bytes <= 2**30
    np.testing.assert_allclose(bounded.grads, free.grads, rtol=1e-5, atol=1e-6 * np.abs(free.grads).max())


# --------------------------------------------------------------------------- projection accuracy


def test_projected_cosines_match_exact_at_default_k(model):
    docs = random_docs(60, 10, 120, seed=4)
    samples = random_samples(docs, 300, seed=4)  # 44,850 pairs
    exact = compute_gradients(model, samples, docs, EXACT)
    proj = compute_gradients(model, samples, docs, GradientsConfig())
    assert proj.grads.shape == (300, 8192) and proj.grads.dtype == np.float32
    assert exact.grads.shape[1] > 8192  # the projection really reduces (25,152 parameters)
    np.testing.assert_allclose(proj.norms, exact.norms, rtol=1e-5)  # norms are of the exact gradient
    diff = np.abs(cosines(proj.grads) - cosines(exact.grads))
    mae, p999 = float(diff.mean()), float(np.quantile(diff, 0.999))
    print(f"projected cosines: MAE {mae:.4f}, p99.9 {p999:.4f}, max {diff.max():.4f} over {diff.size} pairs")
    assert mae <= 0.01
    assert p999 <= 0.05


def test_logra_projection_of_exact_gradients(model):
    """The factored projection, on the same exact gradients as the sjlt test above.

    A Kronecker JL has far more variance than sjlt at the same k: a one-token gradient
    d x^T projects to (P d)(P x)^T, a product of two rank-r estimates. Measured here (dim
    7936, r = 16 per side): MAE 0.049, p99.9 0.20 against sjlt's 0.006 / 0.026. So it misses
    the issue's accuracy bar and is not the default; this test bounds it at what it is,
    a coarser but unbiased sketch, and checks that it still orders pairs like the exact one."""
    docs = random_docs(60, 10, 120, seed=4)
    samples = random_samples(docs, 300, seed=4)
    exact = compute_gradients(model, samples, docs, EXACT)
    proj = compute_gradients(model, samples, docs, GradientsConfig(projection="logra"))
    assert proj.projection["projection"] == "logra" and proj.grads.shape[1] == proj.projection["dim"] <= 8192
    np.testing.assert_allclose(proj.norms, exact.norms, rtol=1e-5)
    diff = np.abs(cosines(proj.grads) - cosines(exact.grads))
    mae, p999 = float(diff.mean()), float(np.quantile(diff, 0.999))
    print(f"logra cosines (dim {proj.grads.shape[1]}): MAE {mae:.4f}, p99.9 {p999:.4f}")
    assert mae <= 0.1 and p999 <= 0.4
    assert np.corrcoef(cosines(proj.grads).ravel(), cosines(exact.grads).ravel())[0, 1] >= 0.9


def test_tensorsketch_cosines_meet_the_bars_at_default_k(model):
    """TensorSketch of the weights (never formed) on the same exact gradients and bars as
    the sjlt test above; the non-matrix blocks (biases) go through sjlt. Its norms are
    the exact ones for biases plus the sketch's estimate for weights: within a few % here."""
    docs = random_docs(60, 10, 120, seed=4)
    samples = random_samples(docs, 300, seed=4)
    exact = compute_gradients(model, samples, docs, EXACT)
    proj = compute_gradients(model, samples, docs, GradientsConfig(projection="tensorsketch"))
    assert proj.projection["projection"] == "tensorsketch" and proj.grads.shape == (300, 8192)
    assert np.abs(proj.norms / exact.norms - 1).max() <= 0.1
    diff = np.abs(cosines(proj.grads) - cosines(exact.grads))
    mae, p999 = float(diff.mean()), float(np.quantile(diff, 0.999))
    print(f"tensorsketch cosines: MAE {mae:.4f}, p99.9 {p999:.4f}, max {diff.max():.4f} over {diff.size} pairs")
    assert mae <= 0.01
    assert p999 <= 0.05


def test_tensorsketch_equals_its_dense_sketch_and_is_deterministic(model):
    """The factored path (weights never formed) gives what the same projector gives from
    the formed exact gradients, and the same numbers on every call."""
    docs = random_docs(8, 10, 60, seed=5)
    samples = random_samples(docs, 16, seed=5)
    cfg = GradientsConfig(projection="tensorsketch", k=512)
    a = compute_gradients(model, samples, docs, cfg)
    b = compute_gradients(model, samples, docs, cfg)
    np.testing.assert_array_equal(a.grads, b.grads)
    params = select_params(model)
    proj = gradients.build_projector(params, cfg)
    exact = compute_gradients(model, samples, docs, EXACT)
    dense = proj.project({name: torch.from_numpy(exact.grads[:, sl].copy())
                          for name, sl in gradients.build_projector(params, EXACT).slices.items()})
    np.testing.assert_allclose(a.grads, dense.numpy(), rtol=1e-4, atol=1e-5 * float(np.abs(dense.numpy()).max()))
    # stability seeds stack further sketches after the main one, which stays bit for bit the same
    stacked = compute_gradients(model, samples, docs, dataclasses.replace(cfg, stability_seeds=(1,)))
    assert stacked.grads.shape == (16, 1024)
    np.testing.assert_array_equal(stacked.grads[:, :512], a.grads)
    with pytest.raises(ConfigError, match="k must be >= 2"):
        GradientsConfig(projection="tensorsketch", k=1)


def test_batch_composition_and_determinism(model):
    docs = random_docs(10, 10, 80, seed=6)
    samples = random_samples(docs, 20, seed=6)
    cfg = GradientsConfig(k=512)
    a = compute_gradients(model, samples, docs, cfg)
    b = compute_gradients(model, samples, docs, cfg)
    assert np.array_equal(a.grads, b.grads)  # same inputs, same bits
    # each sample alone (its own shard, as another worker would compute it)
    for i in (0, 7, 19):
        one = {k: v[i : i + 1] for k, v in samples.items()}
        alone = compute_gradients(model, one, docs, cfg).grads[0]
        np.testing.assert_allclose(alone, a.grads[i], rtol=1e-5, atol=1e-5 * np.abs(a.grads[i]).max())
    # another batch layout
    c = compute_gradients(model, samples, docs, dataclasses.replace(cfg, batch_rows=1, share_context="never"))
    np.testing.assert_allclose(c.grads, a.grads, rtol=1e-4, atol=1e-5 * np.abs(a.grads).max())


def test_inputs_pandas_pyarrow_and_float16(model):
    docs = random_docs(3, 10, 30, seed=7)
    s = random_samples(docs, 5, seed=7)
    s["token_id"] = np.array([docs[int(d)][int(p)] for d, p in zip(s["doc_id"], s["pos"])])
    ref = compute_gradients(model, s, docs, GradientsConfig(k=256)).grads
    for table in (pd.DataFrame(s), pa.table(s)):
        np.testing.assert_array_equal(compute_gradients(model, table, docs, GradientsConfig(k=256)).grads, ref)
    half = compute_gradients(model, s, docs, GradientsConfig(k=256, out_dtype="float16")).grads
    assert half.dtype == np.float16
    np.testing.assert_allclose(half.astype(np.float32), ref, rtol=2e-3, atol=1e-3 * np.abs(ref).max())


# --------------------------------------------------------------------------- bad samples


def test_nan_gradients_are_skipped_named_and_isolated(model):
    docs = random_docs(5, 10, 40, seed=8)
    nan_doc = list(docs)[2]
    docs[nan_doc] = docs[nan_doc].copy()
    docs[nan_doc][0] = 7  # the only document with token 7
    samples = random_samples(docs, 12, seed=8)
    samples["doc_id"] = np.concatenate([samples["doc_id"], [nan_doc, nan_doc]])
    samples["pos"] = np.concatenate([samples["pos"], [1, 9]])
    broken = copy.deepcopy(model)
    with torch.no_grad():
        broken.gpt_neox.embed_in.weight[7] = float("nan")
    clean = compute_gradients(model, samples, docs, GradientsConfig(k=256))
    with pytest.warns(BadGradientWarning) as caught:
        res = compute_gradients(broken, samples, docs, GradientsConfig(k=256))
    expect = samples["doc_id"] == nan_doc
    assert expect.any() and not expect.all()
    assert np.array_equal(res.bad, expect)
    msg = str(caught[0].message)
    for i in np.flatnonzero(expect):
        assert f"sample {i} (doc {nan_doc}, pos {samples['pos'][i]}): gradient is not finite" in msg
        assert res.reasons[int(i)].startswith("gradient is not finite")
    assert (res.grads[expect] == 0).all() and np.isfinite(res.grads).all()
    # the other samples of the same batches are untouched (rows do not interact)
    np.testing.assert_allclose(res.grads[~expect], clean.grads[~expect], rtol=1e-5, atol=1e-6)


def test_exactly_zero_gradient_is_skipped_and_named(model):
    # Make one target certain: its logit 1e4 above the rest, so its loss and its
    # gradient are exactly 0 in fp32.
    docs = random_docs(4, 20, 40, seed=9)
    samples = {"doc_id": np.array(list(docs)), "pos": np.array([5, 10, 15, 12])}
    targets = [int(docs[int(d)][int(p)]) for d, p in zip(samples["doc_id"], samples["pos"])]
    assert len(set(targets)) == 4
    certain = copy.deepcopy(model)
    d0, p0, t0 = int(samples["doc_id"][1]), int(samples["pos"][1]), targets[1]
    with torch.no_grad():
        h = certain.gpt_neox(input_ids=torch.as_tensor(docs[d0][:p0])[None]).last_hidden_state[0, -1]
        certain.get_output_embeddings().weight[t0] = h * (1e4 / h.norm() ** 2)
    with pytest.warns(BadGradientWarning, match=rf"sample 1 \(doc {d0}, pos {p0}\): gradient is exactly zero"):
        res = compute_gradients(certain, samples, docs, GradientsConfig(k=256))
    assert res.bad.tolist() == [False, True, False, False]
    assert res.norms[1] == 0 and (res.grads[1] == 0).all() and (res.norms[[0, 2, 3]] > 0).all()


# --------------------------------------------------------------------------- max_len


def test_targets_beyond_max_len_see_the_last_max_len_minus_1_tokens(model):
    docs = random_docs(2, 60, 60, seed=10)
    # pos 15 still fits (tokens 0..14 are max_len - 1 = 15); 16, 40, 59 are cut
    samples = {"doc_id": np.array([3, 3, 3, 3, 13]), "pos": np.array([5, 15, 16, 40, 59])}
    params = select_params(model)
    res = compute_gradients(model, samples, docs, dataclasses.replace(EXACT, max_len=16))
    assert res.windowed == 3
    assert max_rel_error(res.grads, reference_matrix(model, params, docs, samples, max_len=16)) <= 1e-5
    # and it is a real cut: the full context gives another gradient
    assert max_rel_error(res.grads[3:], reference_matrix(model, params, docs, {k: v[3:] for k, v in samples.items()})) > 1e-2


def test_max_len_limits(model):
    docs = random_docs(1, 300, 300)
    s = {"doc_id": np.array([3]), "pos": np.array([290])}
    with pytest.raises(GradientError, match="max_len is 512 but GPTNeoXForCausalLM was built for 256 positions"):
        compute_gradients(model, s, docs, GradientsConfig(max_len=512, k=64))
    res = compute_gradients(model, s, docs, GradientsConfig(k=64))  # null: the model's 256
    assert res.windowed == 1 and not res.bad.any()
    with pytest.raises(ConfigError, match="max_len must be >= 2"):
        GradientsConfig(max_len=1)


# --------------------------------------------------------------------------- selection and input errors


def test_default_selection_is_the_papers(model):
    params = select_params(model)
    names = [n for n, _ in params]
    assert len(names) == 16 and all(n.startswith("gpt_neox.layers.") for n in names)
    assert not any("norm" in n or "embed" in n for n in names)
    norms = sum(p.numel() for n, p in model.named_parameters() if "norm" in n)
    assert sum(p.numel() for _, p in params) == models.param_counts(model)["non_embedding"] - norms
    mlp = select_params(model, include=[r"\.mlp\."], exclude=[r"\.bias$"])
    assert [n for n, _ in mlp] == [f"gpt_neox.layers.{i}.mlp.{w}.weight"
                                   for i in (0, 1) for w in ("dense_h_to_4h", "dense_4h_to_h")]


def test_patterns_that_match_nothing_list_the_parameters(model):
    with pytest.raises(GradientError, match=r"'dense_h_to_4x' .* matches no parameter.*gpt_neox\.embed_in\.weight.*in all"):
        select_params(model, include=["dense_h_to_4x"])
    with pytest.raises(GradientError, match="gradients.exclude: pattern 'attn'"):
        select_params(model, exclude=["attn"])
    with pytest.raises(GradientError, match="selects no parameter"):
        select_params(model, include=["embed_in"], exclude=["@embeddings"])
    with pytest.raises(ConfigError, match="unknown group '@norm'"):
        GradientsConfig(exclude=("@norm",))
    with pytest.raises(ConfigError, match="not a regular expression"):
        GradientsConfig(include=("mlp[",))
    with pytest.raises(ConfigError, match="unknown key 'projektion'"):
        config_lib.build(GradientsConfig, {"projektion": "none"}, "gradients")
    assert config_lib.build(GradientsConfig, {"include": ["mlp"], "k": 64}, "gradients").include == ("mlp",)


def test_bad_samples_input(model):
    docs = random_docs(2, 10, 10)
    cfg = GradientsConfig(k=64)
    with pytest.raises(GradientError, match="sample 1: document 99 is not in the tokens table"):
        compute_gradients(model, {"doc_id": [3, 99], "pos": [1, 1]}, docs, cfg)
    for pos in (0, 10):
        with pytest.raises(GradientError, match=f"sample 0: pos {pos} is outside document 3 \\(length 10\\)"):
            compute_gradients(model, {"doc_id": [3], "pos": [pos]}, docs, cfg)
    wrong = int(docs[3][4]) + 1
    with pytest.raises(GradientError, match=f"sample 0: token_id {wrong} but document 3 has token"):
        compute_gradients(model, {"doc_id": [3], "pos": [4], "token_id": [wrong]}, docs, cfg)
    with pytest.raises(GradientError, match="need columns doc_id and pos"):
        compute_gradients(model, {"doc": [3], "pos": [4]}, docs, cfg)
    empty = compute_gradients(model, {"doc_id": [], "pos": []}, docs, cfg)
    assert empty.grads.shape == (0, 64)


def test_plan_rows_shares_only_when_it_saves_work():
    doc_ids = np.array([1, 1, 1, 1, 2])
    pos = np.array([20, 25, 5, 60, 25])
    rows = memory_plan.plan_rows(doc_ids, pos, max_len=1000, share_context="auto")
    groups = sorted(sorted(int(pos[i]) for i in r.samples) for r in rows)
    assert groups == [[5], [20, 25], [25], [60]]
    assert len(memory_plan.plan_rows(doc_ids, pos, 1000, "always")) == 2
    assert len(memory_plan.plan_rows(doc_ids, pos, 1000, "never")) == 5
    # a different window start is a different context
    windowed = memory_plan.plan_rows(np.array([1, 1]), np.array([30, 31]), max_len=10, share_context="always")
    assert sorted((r.start, r.end) for r in windowed) == [(21, 30), (22, 31)]


# --------------------------------------------------------------------------- memory and work plans


def test_measured_row_memory_grows_with_length_and_bounds_the_batches(model):
    params = select_params(model)
    engine = per_sample.Engine(model, params, gradients.NoProjection([(n, p.numel()) for n, p in params]))
    with per_sample.grad_mode(model, params):
        short, long = engine.measure(16), engine.measure(64)
        mem = memory_plan.plan_memory(engine, 64, memory_gb=64.0)
    assert 0 < short < long
    # the fitted memory model reproduces both measurements
    assert mem.row_bytes(16) == pytest.approx(short, rel=1e-6) and mem.row_bytes(64) == pytest.approx(long, rel=1e-6)
    # a budget of ~3 rows of 64 tokens gives batches the model estimates within the budget
    tight = dataclasses.replace(mem, budget=3.5 * mem.batch_bytes(1, 64))
    rows = memory_plan.plan_rows(np.arange(20) % 10, np.full(20, 63), max_len=64, share_context="never")
    batches = memory_plan.plan_batches(rows, batch_tokens=10**9, batch_rows=10**6, memory=tight)
    assert max(len(b) for b in batches) == 3 and sum(len(b) for b in batches) == 20
    assert all(tight.batch_bytes(len(b), max(r.length for r in b)) <= tight.budget for b in batches)


def test_memory_bound_changes_batches_not_gradients(model):
    docs = random_docs(12, 5, 90, seed=4)
    samples = random_samples(docs, 30, seed=4)
    free = compute_gradients(model, samples, docs, dataclasses.replace(EXACT, memory_gb=None))
    # room for a few of the longest rows beyond what this process holds (and 32 MiB for its noise)
    params = select_params(model)
    engine = per_sample.Engine(model, params, gradients.NoProjection([(n, p.numel()) for n, p in params]))
    with per_sample.grad_mode(model, params):
        mem = memory_plan.plan_memory(engine, 90, memory_gb=64.0)
    held = free.grads.nbytes + free.norms.nbytes
    gb = (resident_bytes() + held + memory_plan.RESERVE_BYTES + 3.5 * mem.batch_bytes(1, 90) + 2**25) / 2**30
    bounded = compute_gradients(model, samples, docs, dataclasses.replace(EXACT, memory_gb=gb))
    np.testing.assert_allclose(bounded.grads, free.grads, rtol=1e-5, atol=1e-6 * np.abs(free.grads).max())
    with pytest.raises(GradientError, match="leaves no room.*gradients.memory_gb"):
        compute_gradients(model, samples, docs, dataclasses.replace(EXACT, memory_gb=0.1))
    with pytest.raises(ConfigError, match="gradients.memory_gb"):
        GradientsConfig(memory_gb=0)


def test_calibrated_memory_model_bounds_the_measured_peak():
    """The planned batches' measured peaks stay within the bound the plan was made for
    (a model with rows of ~10 MiB, so the bound is not lost in the process's own noise)."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(0)
    cfg = GPTNeoXConfig(vocab_size=512, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                        intermediate_size=1024, max_position_embeddings=512)
    model = GPTNeoXForCausalLM(cfg).eval()
    params = select_params(model)
    engine = per_sample.Engine(model, params, gradients.NoProjection([(n, p.numel()) for n, p in params]))
    rng = np.random.default_rng(5)
    docs = {d: rng.integers(0, 512, 385) for d in range(16)}
    doc_ids, pos = np.arange(16), np.full(16, 384)
    targets = np.array([docs[d][p] for d, p in zip(doc_ids, pos)])
    with per_sample.grad_mode(model, params):
        probe = memory_plan.plan_memory(engine, 384, memory_gb=64.0)
        assert probe.scale >= 1.0
        gb = (resident_bytes() + memory_plan.RESERVE_BYTES + 4.5 * probe.batch_bytes(1, 384)) / 2**30
        mem = memory_plan.plan_memory(engine, 384, memory_gb=gb)
        batches = memory_plan.plan(doc_ids, pos, 384, "never", 10**9, 10**6, mem)
        assert 1 < max(len(b) for b in batches) < 16
        for batch in batches:
            with Peak() as peak:
                engine.run(batch, lambda r: docs[r.doc_id][r.start : r.end], targets, verify=False)
            assert peak.bytes <= gb * 2**30
        with pytest.raises(GradientError, match="one row of 384 tokens.*raise gradients.memory_gb or lower gradients.max_len"):
            memory_plan.plan_memory(engine, 384, memory_gb=(resident_bytes() + memory_plan.RESERVE_BYTES + 2**20) / 2**30)


def test_auto_sharing_never_plans_more_work_than_never():
    """Real-text-like rows (12 targets per document at lengths 27..499, where sharing did more
    work) and planted-like rows (targets close together in short documents, where it saves)."""
    rng = np.random.default_rng(0)
    long_docs = (np.repeat(np.arange(40), 12),
                 np.concatenate([np.sort(rng.choice(np.arange(27, 500), 12, replace=False)) for _ in range(40)]))
    short_docs = (np.repeat(np.arange(100), 4), np.tile(np.array([22, 25, 28, 31]), 100))
    for (doc_ids, pos), sharing_helps in ((long_docs, False), (short_docs, True)):
        work = {share: memory_plan.planned_work(memory_plan.plan(doc_ids, pos, 512, share, 8192, 32))
                for share in ("auto", "always", "never")}
        print(work)
        assert (work["always"] < work["never"]) == sharing_helps
        assert work["auto"] <= work["never"]
