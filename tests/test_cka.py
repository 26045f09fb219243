"""fm_lightning.cka: linear CKA against a NumPy float64 reference, its invariances, the count
sketch of wide layers on real activations, the recorder (batches, ranks) and its files."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import REPO

from fm_lightning.cka import (
    SKETCH_WIDTH,
    SimilarityRecord,
    SimilarityRecorder,
    _sketch,
    centered_gram,
    cka_matrix,
    count_sketch,
    linear_cka,
    load_record,
    save_record,
)
from fm_lightning.data import MNIST_MEAN, MNIST_STD, load_mnist
from fm_lightning.models import SimpleCNN


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def numpy_cka(x, y):
    """The formula of Kornblith et al. 2019, written out in float64 NumPy."""
    x = x.reshape(len(x), -1).double().numpy()
    y = y.reshape(len(y), -1).double().numpy()
    h = np.eye(len(x)) - np.ones((len(x), len(x))) / len(x)
    k, l = h @ x @ x.T @ h, h @ y @ y.T @ h  # noqa: E741
    return float((k * l).sum() / (np.linalg.norm(k) * np.linalg.norm(l)))


def cka(x, y):
    return linear_cka(centered_gram(x), centered_gram(y))


def activations(model, x, names):
    """{name: output} of ``model``'s named submodules on ``x``, in eval mode."""
    out, modules = {}, dict(model.named_modules())
    hooks = [
        modules[name].register_forward_hook(lambda m, i, o, name=name: out.update({name: o}))
        for name in names
    ]
    try:
        with torch.no_grad():
            model.eval()(x)
    finally:
        for hook in hooks:
            hook.remove()
    return out


@pytest.fixture(scope="module")
def mnist512(mnist_dir):
    images, _ = load_mnist(f"{mnist_dir}/MNIST/raw", "test")
    return ((images[:512].float() / 255 - MNIST_MEAN) / MNIST_STD).reshape(512, 1, 28, 28)


# ---------------------------------------------------------------------------- the formula


def test_cka_is_one_for_the_same_representation_rotated_or_scaled():
    x = randn(64, 20)
    q, _ = torch.linalg.qr(randn(20, 20, seed=1).double())  # orthogonal
    assert torch.allclose(q.T @ q, torch.eye(20, dtype=torch.float64), atol=1e-12)
    assert cka(x, x) == pytest.approx(1.0, abs=1e-5)
    assert cka(x, (x.double() @ q).float()) == pytest.approx(1.0, abs=1e-5)
    for a in (1e-3, 0.5, 7.0, 1e3):
        assert cka(x, a * x) == pytest.approx(1.0, abs=1e-5)
    assert cka(x, x + 5.0) == pytest.approx(1.0, abs=1e-5)  # a shift is centred away
    # Any order of an input's features: a map read as (C, H, W) or as tokens (H*W, C).
    maps = randn(64, 8, 5, 5)
    assert cka(maps, maps.permute(0, 2, 3, 1)) == pytest.approx(1.0, abs=1e-5)


def test_cka_equals_a_float64_numpy_reference_on_random_data_and_a_real_layer(mnist512):
    x, y = randn(100, 30), randn(100, 7, seed=1) + randn(100, 30)[:, :7]
    assert cka(x, y) == pytest.approx(numpy_cka(x, y), abs=1e-5)
    acts = activations(SimpleCNN(), mnist512[:256], ["conv1", "conv2"])
    got = cka(acts["conv1"], acts["conv2"])
    assert got == pytest.approx(numpy_cka(acts["conv1"], acts["conv2"]), abs=1e-5)
    assert 0.5 < got < 0.999  # related layers, but not the same representation


def test_independent_representations_are_near_zero_only_when_narrower_than_n():
    """Linear CKA of independent white representations is about sqrt(pq / ((n + p)(n + q))):
    near 0 for p, q << n, but not for wide ones (the issue's "< 0.05 for n >= 512" needs that)."""
    n = 512
    for p, q in ((8, 8), (16, 4)):
        assert cka(randn(n, p, seed=p), randn(n, q, seed=q + 1)) < 0.05
    for p, q in ((512, 512), (4096, 4096)):  # 0.50 and 0.89
        got = cka(randn(n, p, seed=p), randn(n, q, seed=q + 1))
        assert got == pytest.approx(math.sqrt(p * q / ((n + p) * (n + q))), rel=0.02)


def test_a_constant_dead_or_non_finite_layer_has_no_cka_never_nan():
    x = randn(33, 10)
    constant = torch.full((33, 10), 0.1) + torch.arange(10.0) / 3  # each feature constant
    dead = torch.zeros(33, 4, 3, 3)
    # A constant computed in different orders (a GPU's reductions) differs by a float32 ulp or
    # so between inputs: rounding, not a representation, and so no CKA either.
    jitter = torch.full((33, 6), 1e4 / 3)
    jitter[::2] = torch.nextafter(jitter[::2], torch.tensor(math.inf))
    broken = x.clone()
    broken[3, 2] = math.nan
    for layer in (constant, dead, jitter, broken):
        assert cka(x, layer) is None
        assert cka(layer, layer) is None
    assert centered_gram(constant).abs().max() == 0  # exactly zero, not rounding noise
    values, defined = cka_matrix(
        {"x": centered_gram(x), "dead": centered_gram(dead)},
        {"x": centered_gram(x), "nan": centered_gram(broken)},
    )
    assert defined.tolist() == [[True, False], [False, False]]
    assert values[0, 0] == pytest.approx(1.0, abs=1e-6)
    assert values.isfinite().all() and values[~defined].eq(0).all()


def test_the_formula_checks_its_inputs():
    with pytest.raises(ValueError, match=r"expected x of shape \(n >= 2, ...\), got \(1, 3\)"):
        centered_gram(torch.zeros(1, 3))
    with pytest.raises(TypeError, match="expected x to be a Tensor, got list"):
        centered_gram([[1.0]])
    with pytest.raises(ValueError, match=r"same n, got \(4, 4\) and \(5, 5\)"):
        linear_cka(torch.eye(4), torch.eye(5))


# ---------------------------------------------------------------------------- wide layers


def test_count_sketch_is_linear_fixed_by_width_and_keeps_narrow_layers_as_they_are():
    x = randn(10, 3, 40, 40)  # p = 4800 > SKETCH_WIDTH
    whole = count_sketch(x)
    assert whole.shape == (10, SKETCH_WIDTH)
    # Batch by batch, and again later (another epoch, run or rank): the same values.
    assert torch.allclose(torch.cat([count_sketch(x[:3]), count_sketch(x[3:])]), whole)
    assert torch.allclose(count_sketch(x.clone()), whole)
    assert torch.equal(count_sketch(x[:, :1, :32, :32]), x[:, :1, :32, :32].reshape(10, -1))
    # E[<Sx, Sy>] = <x, y>: a Gram of sketched rows is close to the exact one.
    exact, sketched = x.flatten(1) @ x.flatten(1).T, whole @ whole.T
    assert torch.allclose(sketched.diagonal(), exact.diagonal(), rtol=0.1)
    # A ResNet stem's (64, 112, 112) output: p = 802,816 values, kept as two length-p vectors
    # (bucket, sign), never a p x 4096 matrix (13 GB in float32).
    stem = randn(2, 64, 112, 112)
    assert count_sketch(stem).shape == (2, SKETCH_WIDTH)
    bucket, sign = _sketch(802_816, SKETCH_WIDTH, stem.device)
    assert bucket.shape == sign.shape == (802_816,) and set(sign.unique().tolist()) == {-1, 1}


def test_sketched_cka_is_within_0_02_of_the_exact_on_real_layers(mnist512):
    """SimpleCNN (random weights) on 512 MNIST test digits: conv1 and relu1 (p = 9216) are
    sketched, conv2 (2048) is not. Cross-layer CKA, and each layer against itself after the
    weights moved (an epoch's training), from sketched vs exact Grams."""
    torch.manual_seed(0)
    net = SimpleCNN()
    moved = SimpleCNN()
    moved.load_state_dict(net.state_dict())
    with torch.no_grad():
        for p in moved.parameters():
            p.add_(0.3 * p.std() * torch.randn_like(p))
    names = ["conv1", "relu1", "conv2"]
    before, after = activations(net, mnist512, names), activations(moved, mnist512, names)
    assert all(before[n][0].numel() > SKETCH_WIDTH for n in names[:2])
    exact = {n: centered_gram(a) for n, a in before.items()}
    sketched = {n: centered_gram(count_sketch(a)) for n, a in before.items()}
    exact_values, _ = cka_matrix(exact, exact)
    sketched_values, _ = cka_matrix(sketched, sketched)
    worst = (exact_values - sketched_values).abs().max().item()
    for n in names:
        e = linear_cka(exact[n], centered_gram(after[n]))
        s = linear_cka(sketched[n], centered_gram(count_sketch(after[n])))
        worst = max(worst, abs(e - s))
    assert 0 < worst < 0.02  # measured 0.0042 (benchmarks/similarity_cost.py prints it)


@pytest.mark.slow
def test_sketched_cka_is_within_0_02_of_the_exact_on_a_timm_resnet(mnist512):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    net = timm.create_model("resnet18", pretrained=False, num_classes=10)
    x = torch.nn.functional.interpolate(mnist512, size=64).expand(-1, 3, -1, -1)
    names = ["layer1", "layer2", "layer3"]  # p = 16384, 8192, 4096
    acts = activations(net, x, names)
    exact = {n: centered_gram(a) for n, a in acts.items()}
    sketched = {n: centered_gram(count_sketch(a)) for n, a in acts.items()}
    deviation = (cka_matrix(exact, exact)[0] - cka_matrix(sketched, sketched)[0]).abs().max()
    assert 0 < deviation < 0.02  # measured 0.0059


# ---------------------------------------------------------------------------- the recorder


def record_of(batches, n, features, **kwargs):
    recorder = SimilarityRecorder(n, features, **kwargs)
    for indices, x, acts in batches:
        recorder.observe_inputs(indices, x)
        for layer, act in acts.items():
            recorder.observe(layer, indices, act)
    return recorder


def dataset(size=12, seed=0):
    """Inputs and two layers' outputs, one wide (sketched) and one narrow."""
    x = randn(size, 2, 3, seed=seed)
    return x, {"wide": randn(size, 5000, seed=seed + 1), "narrow": randn(size, 4, 2, seed=seed + 2)}


def test_recorder_takes_batches_in_any_order_and_ignores_indices_beyond_n():
    x, acts = dataset()
    n, features = 8, {"wide": 5000, "narrow": 8}
    order = torch.tensor([11, 3, 0, 7, 9, 5, 1, 2, 10, 6, 4, 8])
    batches = [(i, x[i], {k: a[i] for k, a in acts.items()}) for i in order.split(5)]
    record = record_of(batches, n, features).record()
    assert torch.equal(record.indices, torch.arange(n))
    assert torch.allclose(record.grams["narrow"], centered_gram(acts["narrow"][:n]), atol=1e-5)
    assert torch.allclose(
        record.grams["wide"], centered_gram(count_sketch(acts["wide"][:n])), atol=1e-3
    )
    in_order = record_of([(torch.arange(12), x, acts)], n, features).record()
    assert record.inputs_sha256 == in_order.inputs_sha256
    assert all(torch.allclose(record.grams[k], in_order.grams[k], atol=1e-3) for k in features)
    other = x.clone()
    other[2, 0, 0] += 1e-3
    changed = record_of([(torch.arange(12), other, acts)], n, features).record()
    assert changed.inputs_sha256 != record.inputs_sha256


def test_recorder_refuses_a_record_of_fewer_than_n_inputs_and_bad_arguments():
    x, acts = dataset()
    recorder = record_of(
        [(torch.arange(6), x[:6], {"narrow": acts["narrow"][:6]})], 8, {"narrow": 8}
    )
    assert recorder.seen == {"narrow": 6, "inputs": 6}
    with pytest.raises(
        ValueError, match=r"expected all 8 inputs .* got 6 \(first missing: index 6\)"
    ):
        recorder.record()
    with pytest.raises(ValueError, match="expected 'narrow' to output 8 values per input, got 3"):
        recorder.observe("narrow", torch.arange(2), torch.zeros(2, 3))
    with pytest.raises(KeyError, match="expected one of the layers"):
        recorder.observe("conv9", torch.arange(2), torch.zeros(2, 8))
    with pytest.raises(ValueError, match="expected indices as a LongTensor"):
        recorder.observe("narrow", torch.arange(3), torch.zeros(2, 8))
    with pytest.raises(ValueError, match="expected n to be an int >= 2, got 1"):
        SimilarityRecorder(1, {"narrow": 8})


def test_merging_ranks_states_equals_one_process_on_the_same_data():
    """Two ranks, as a DistributedSampler splits 10 inputs (the last one padded with index 0, so
    index 0 is on both): stacked as all_gather stacks them, merged, the same record."""
    x, acts = dataset(size=10)
    n, features = 10, {"wide": 5000, "narrow": 8}
    single = record_of([(torch.arange(10), x, acts)], n, features)
    ranks = [torch.tensor([0, 2, 4, 6, 8]), torch.tensor([1, 3, 5, 7, 9, 0])]
    states = [
        record_of([(i, x[i], {k: a[i] for k, a in acts.items()})], n, features).state()
        for i in ranks
    ]
    gathered = {
        "rows": {k: torch.stack([s["rows"][k] for s in states]) for k in features},
        "seen": {k: torch.stack([s["seen"][k] for s in states]) for k in features},
        "digests": torch.stack([s["digests"] for s in states]),
        "digested": torch.stack([s["digested"] for s in states]),
    }
    merged = SimilarityRecorder(n, features)
    merged.merge(gathered)
    assert merged.seen == {"wide": 10, "narrow": 10, "inputs": 10}
    a, b = merged.record(), single.record()
    assert a.inputs_sha256 == b.inputs_sha256
    assert all(torch.equal(a.grams[k], b.grams[k]) for k in features)
    alone = SimilarityRecorder(n, features)
    alone.merge(single.state())  # one process: all_gather returns the state as it is
    assert torch.equal(alone.record().grams["wide"], b.grams["wide"])


# ---------------------------------------------------------------------------- files


def a_record(n=6, layers=("conv1", "conv2")):
    return SimilarityRecord(
        torch.arange(n),
        "ab" * 32,
        {k: centered_gram(randn(n, 5, seed=i)) for i, k in enumerate(layers)},
    )


def test_a_record_round_trips_through_weights_only_torch_load(tmp_path):
    path = save_record(a_record(), tmp_path / "similarity" / "epoch=003.pt")
    assert [p.name for p in path.parent.iterdir()] == ["epoch=003.pt"]  # no temporary left
    raw = torch.load(path, weights_only=True)
    assert sorted(raw) == ["grams", "indices", "inputs_sha256"]
    loaded = load_record(path)
    assert torch.equal(loaded.indices, torch.arange(6)) and loaded.inputs_sha256 == "ab" * 32
    assert list(loaded.grams) == ["conv1", "conv2"]
    assert torch.equal(loaded.grams["conv2"], a_record().grams["conv2"])


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ({"indices": torch.arange(6)}, r"keys \['indices', 'inputs_sha256', 'grams'\], got"),
        ({**a_record().to_dict(), "indices": torch.arange(6.0)}, "indices as a LongTensor"),
        ({**a_record().to_dict(), "inputs_sha256": "xyz"}, "64 hex digits, got 'xyz'"),
        ({**a_record().to_dict(), "grams": {"c": torch.zeros(5, 5)}}, r"float32 \(6, 6\), got"),
        ({**a_record().to_dict(), "grams": {"c": torch.zeros(6, 6).double()}}, "float32"),
        ({**a_record().to_dict(), "grams": {}}, "non-empty"),
        ([1, 2], r"keys .*got list"),
    ],
)
def test_load_record_names_what_is_wrong_with_a_file(tmp_path, content, message):
    path = tmp_path / "epoch=000.pt"
    torch.save(content, path)
    with pytest.raises(ValueError, match=message):
        load_record(path)
    if isinstance(content, dict) and len(content) == 3:  # save_record refuses it too
        with pytest.raises(ValueError, match=message):
            save_record(SimilarityRecord(**content), tmp_path / "new" / "epoch=000.pt")
        assert not (tmp_path / "new" / "epoch=000.pt").exists()


def test_load_record_refuses_damaged_and_code_carrying_files(tmp_path):
    path = save_record(a_record(), tmp_path / "epoch=000.pt")
    path.write_bytes(path.read_bytes()[:200])  # cut short, as a full disk leaves it
    with pytest.raises(
        ValueError, match=r"cannot read .*epoch=000.pt: not a file torch.save wrote"
    ):
        load_record(path)
    code = {"indices": torch.arange(2), "inputs_sha256": "0" * 64, "grams": {"c": SimpleCNN()}}
    torch.save(code, path)
    with pytest.raises(ValueError, match="cannot read"):  # weights_only: no objects are built
        load_record(path)
    with pytest.raises(FileNotFoundError):
        load_record(tmp_path / "epoch=009.pt")


@pytest.mark.slow
def test_two_ddp_cpu_processes_make_the_same_record_as_one(tmp_path):
    """Real Lightning DDP (2 CPU processes, all_gather of state()): the inputs split over the
    ranks, input 0 on both (the sampler's padding); merged, the same Grams as one process."""
    script = REPO / "tests" / "scripts" / "ddp_similarity.py"
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    saw = {}
    for devices in (1, 2):
        run = subprocess.run(
            [sys.executable, str(script), f"{devices}.pt", "--devices", str(devices)],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
        # Two ranks' lines may interleave (one's newline after the other's text): count tokens.
        saw[devices] = sorted(int(k) for k in re.findall(r"saw=(\d+)", run.stdout))
    assert saw == {1: [50], 2: [25, 26]}  # split over the ranks, input 0 on both
    one, two = load_record(tmp_path / "1.pt"), load_record(tmp_path / "2.pt")
    assert one.inputs_sha256 == two.inputs_sha256 and torch.equal(one.indices, two.indices)
    assert list(one.grams) == list(two.grams) == ["conv1", "conv2"]
    for layer in one.grams:
        assert torch.allclose(one.grams[layer], two.grams[layer], rtol=1e-6, atol=1e-6), layer


def test_an_unchanged_layer_observed_in_other_batches_has_cka_1_with_itself(mnist512):
    """What a frozen layer's to_previous reads: the same weights, inputs batched differently
    (another epoch, another rank split), the sketched conv1 and the exact conv2 -> 1.0."""
    torch.manual_seed(0)
    net = SimpleCNN().eval()
    features = {"conv1": 9216, "conv2": 2048}

    def record(batch_size):
        recorder = SimilarityRecorder(512, features)
        for indices in torch.arange(512).split(batch_size):
            acts = activations(net, mnist512[indices], list(features))
            recorder.observe_inputs(indices, mnist512[indices])
            for layer, act in acts.items():
                recorder.observe(layer, indices, act)
        return recorder.record()

    first, later = record(64), record(100)
    assert first.inputs_sha256 == later.inputs_sha256
    for layer in features:
        assert linear_cka(first.grams[layer], later.grams[layer]) == pytest.approx(1.0, abs=1e-6)
