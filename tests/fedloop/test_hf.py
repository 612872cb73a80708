"""Your own model and data: the hf tasks from a TOML file through `tsfa run`, on tiny models.

The models are randomly initialised from a config (BERT-style classifier, Llama-style causal
LM), saved with ``save_pretrained`` into a temporary folder with the shipped MiniLM tokenizer.
"""

import csv
import gc
import json
import math
import warnings

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

import soft  # noqa: E402
from fedloop import History, LocalPool, RunConfig, Server, register_task, run  # noqa: E402
from fedloop import data as fd  # noqa: E402
from fedloop.config import REGISTERED_TASKS  # noqa: E402
from fedloop.tasks import LinearTask, make_task, resolve_device  # noqa: E402
from tsfa import LoraShape  # noqa: E402
from tsfa.cli import main  # noqa: E402

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            max_position_embeddings=64)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matrices: one thread is faster, and steadier on a shared machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Two saved tiny models and the data files: reviews.csv (text, label, movie), qa.jsonl
    (prompt, text) and lm.csv (600 review snippets)."""
    d = tmp_path_factory.mktemp("hf")
    tok = transformers.AutoTokenizer.from_pretrained(str(fd.minilm_path()), local_files_only=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        bert = transformers.AutoModelForSequenceClassification.from_config(
            transformers.BertConfig(vocab_size=len(tok), num_labels=2, **TINY))
        llama = transformers.AutoModelForCausalLM.from_config(
            transformers.LlamaConfig(vocab_size=len(tok), num_key_value_heads=2, pad_token_id=tok.pad_token_id,
                                     **TINY))
    for name, model in (("bert", bert), ("llama", llama)):
        model.save_pretrained(d / name)
        tok.save_pretrained(d / name)
    rt = fd.load_rotten_tomatoes()
    pick = np.random.default_rng(0).choice(len(rt), 1000, replace=False)
    with open(d / "reviews.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["text", "label", "movie"])
        for i in pick[:240]:
            w.writerow([rt.texts[i], "fresh" if rt.labels[i] else "rotten", rt.movie_names[rt.movies[i]]])
    with open(d / "qa.jsonl", "w", encoding="utf-8") as f:
        for i in pick[240:400]:
            f.write(json.dumps({"prompt": f"Review of {rt.movie_names[rt.movies[i]]}:", "text": rt.texts[i]}) + "\n")
    with open(d / "lm.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["text"])
        w.writerows([rt.texts[i]] for i in pick[400:])
    return d


def toml(path, hf: dict, **kw) -> str:
    """A TOML run config: top-level keys, then the [hf] table."""
    def value(v):
        return json.dumps(v) if not isinstance(v, bool) else str(v).lower()

    lines = [f"{k} = {value(v)}" for k, v in kw.items()] + ["[hf]"] + [f"{k} = {value(v)}" for k, v in hf.items()]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def cls_config(files, tmp_path, **kw):
    base = dict(task="hf-classification", rounds=2, clients=3, rank=4, keep=2, lr=0.01, local_steps=2,
                batch_size=8, max_length=24, test_size=40, drift="linear", out=str(tmp_path / "run"))
    hf = dict(model=str(files / "bert"), dataset=str(files / "reviews.csv"), client_split="column",
              split_column="movie")
    hf.update(kw.pop("hf", {}))
    return {**base, **kw}, hf


def lm_config(files, tmp_path, **kw):
    base = dict(task="hf-causal-lm", rounds=2, clients=3, rank=4, keep=2, lr=0.01, local_steps=2, batch_size=8,
                max_length=24, test_size=40, drift="linear", out=str(tmp_path / "run"))
    hf = dict(model=str(files / "llama"), dataset=str(files / "qa.jsonl"), prompt_column="prompt")
    hf.update(kw.pop("hf", {}))
    return {**base, **kw}, hf


# -- tsfa run on both tasks ----------------------------------------------------------------------
@pytest.mark.parametrize("strategy", ["tsfa", "fedit"])
@pytest.mark.parametrize("which", ["classification", "causal-lm"])
def test_tsfa_run_from_toml(files, tmp_path, capsys, which, strategy):
    top, hf = (cls_config if which == "classification" else lm_config)(files, tmp_path, strategy=strategy)
    assert main(["run", toml(tmp_path / "run.toml", hf, **top), "--quiet"]) == 0
    assert f"{strategy} on hf-{which}: 2 rounds" in capsys.readouterr().out
    h = History.load(top["out"])
    assert len(h.rounds) == 2 and all(np.isfinite(r["test_loss"]) for r in h.rounds)
    task = make_task(RunConfig(**top, hf=hf))
    shape = LoraShape.from_model(task.model)
    assert shape == soft.shape_of(task.factors())  # the model's modules are what the codec sees
    head_bits = 32 * sum(p.numel() for p in task.head().values())
    assert h.meta["head_bits"] == head_bits
    ok = [c for c in h.clients if c["status"] == "ok"]
    assert ok
    for c in h.clients:  # the ledger's bits are the encoded payload's bytes plus the dense head
        assert c["uplink_bits"] == (shape.payload_bits(c["keep"]) + head_bits if c["status"] == "ok" else 0)
    if which == "classification":
        assert head_bits == 32 * (32 * 2 + 2)  # the classifier (2 labels from the data) travels
        assert 0 <= h.rounds[-1]["accuracy"] <= 1
        assert [m.name for m in shape.modules][:2] == ["bert.encoder.layer.0.attention.self.query",
                                                       "bert.encoder.layer.0.attention.self.value"]
    else:
        assert head_bits == 0 and math.isnan(h.rounds[-1]["accuracy"])
        assert h.rounds[-1]["perplexity"] == pytest.approx(math.exp(h.rounds[-1]["test_loss"]))
        # peft's default for Llama, q_proj and v_proj; v has 2 key/value heads of 8: 16 × 32
        assert [(m.name.rsplit(".", 1)[-1], m.out_features, m.in_features) for m in shape.modules[:2]] == \
            [("q_proj", 32, 32), ("v_proj", 16, 32)]


def test_the_encoded_bytes_are_the_ledger_bits(files, tmp_path):
    top, hf = lm_config(files, tmp_path, clients=2)
    server = Server(RunConfig(**top, hf=hf))
    pool = LocalPool(server)
    pool.train(0)
    up = pool.upload(0, [0, 1], {0: 1, 1: 3}, {0: 1e6, 1: 1e6})
    for k, keep in ((0, 1), (1, 3)):
        assert isinstance(up[k].payload, bytes) and 8 * len(up[k].payload) == up[k].bits
        assert up[k].bits == server.soft_shape.payload_bits(keep)
    # the prompt is fed but not scored: its tokens carry no target
    task = server.task
    first_text = task.tokenizer(task.prompts[0], task.texts[0])["input_ids"]
    prompt_len = len(task.tokenizer(task.prompts[0])["input_ids"])
    scored = task.targets[0][task.targets[0] != -100]
    assert scored.tolist() == first_text[prompt_len:prompt_len + len(scored)]


def _live():
    """Bytes of the CPU tensor storages alive, and the number of Llama models alive."""
    gc.collect()
    seen, total, models = set(), 0, 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # isinstance on deprecated torch objects
        objects = [o for o in gc.get_objects() if isinstance(o, (torch.Tensor, transformers.LlamaForCausalLM))]
    for o in objects:
        if isinstance(o, transformers.LlamaForCausalLM):
            models += 1
        elif o.device.type == "cpu":
            st = o.untyped_storage()
            if st.data_ptr() not in seen:
                seen.add(st.data_ptr())
                total += st.nbytes()
    return total, models


def test_memory_stays_flat_in_clients(files, tmp_path):
    """One base model for all K clients: from K = 2 to K = 8 the live tensors grow by adapters
    (well under one model's weights), and one model is alive either way."""
    before, models_before = _live()
    grown, models = {}, {}
    for K in (2, 8):
        top, hf = lm_config(files, tmp_path, clients=K, rounds=1, strategy="fedit", out=str(tmp_path / f"k{K}"))
        server = Server(RunConfig(**top, hf=hf))
        server.step(LocalPool(server))
        after, models_after = _live()
        grown[K], models[K] = after - before, models_after - models_before
        model_bytes = sum(p.numel() * p.element_size() for p in server.task.model.parameters())
        del server
    assert models == {2: 1, 8: 1}
    assert grown[2] > model_bytes / 2  # the measurement sees the model
    assert grown[8] - grown[2] < 0.25 * model_bytes  # K models would add 6 × model_bytes


# -- real text: perplexity goes down ---------------------------------------------------------------
def test_causal_lm_lowers_perplexity_on_review_text(files, tmp_path):
    """TSFA on 560 review snippets (the Rotten Tomatoes corpus), LoRA on the attention's q and v
    and on the output layer: the held-out perplexity of the random tiny model (about the
    vocabulary's 30 522 at the start) falls to under half within 10 rounds."""
    top, hf = lm_config(files, tmp_path, rounds=10, clients=2, rank=8, keep=4, lr=0.01, local_steps=2,
                        batch_size=8, max_length=12, eval_every=5, strategy="tsfa",
                        hf=dict(dataset=str(files / "lm.csv"), prompt_column=None,
                                target_modules="q_proj, v_proj, lm_head"))
    h = run(RunConfig(**top, hf={k: v for k, v in hf.items() if v is not None}), progress=False)
    before, after = math.exp(h.meta["initial_test_loss"]), h.rounds[-1]["perplexity"]
    print(f"held-out perplexity {before:.1f} -> {after:.1f} over 10 rounds")
    assert before > 10_000 and after < 0.5 * before
    assert h.rounds[4]["perplexity"] < before


# -- bad configurations: one line, exit 2 ------------------------------------------------------------
BAD = {
    "missing model": ({"model": "/no/such/model"}, {}, "hf.model = '/no/such/model'"),
    "missing column": ({"text_column": "body"}, {}, "hf.text_column = 'body' is not a column"),
    "unknown target module": ({"target_modules": ["query", "qkv_proj"]}, {}, "hf.target_modules: the model has no "
                              "module 'qkv_proj'"),
    "cuda without a GPU": ({}, {"device": "cuda"}, "device = 'cuda' but this machine has no CUDA GPU"),
    "bad dtype": ({}, {"dtype": "float16"}, "dtype must be one of"),
    "missing dataset": ({"dataset": "/no/such.csv"}, {}, "hf.dataset = '/no/such.csv': no such file"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_configurations_are_one_line(files, tmp_path, capsys, case):
    if case == "cuda without a GPU" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    hf_change, top_change, message = BAD[case]
    top, hf = cls_config(files, tmp_path, **top_change, hf=hf_change)
    assert main(["run", toml(tmp_path / "bad.toml", hf, **top), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("tsfa: error: ") and message in err, err


# -- devices, dtypes and the registry -----------------------------------------------------------------
def test_auto_is_the_cpu_here_and_bfloat16_keeps_the_wire(files, tmp_path):
    if not torch.cuda.is_available():
        assert resolve_device("auto") == torch.device("cpu")
    top, hf = cls_config(files, tmp_path, rounds=1, strategy="fixed", device="auto")
    h32 = run(RunConfig(**top, hf=hf), progress=False)
    top["out"] = str(tmp_path / "bf16")
    task = make_task(RunConfig(**top, dtype="bfloat16", hf=hf))
    base = task.model.base_model.model.bert.embeddings.word_embeddings.weight
    assert base.dtype == torch.bfloat16  # the base model in bfloat16, the adapter in float32
    assert all(A.dtype == B.dtype == torch.float32 for A, B in task.factors().values())
    h16 = run(RunConfig(**top, dtype="bfloat16", hf=hf), progress=False)
    assert np.isfinite(h16.rounds[-1]["test_loss"])
    assert [c["uplink_bits"] for c in h16.clients] == [c["uplink_bits"] for c in h32.clients]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_run_keeps_the_ledger(files, tmp_path):  # pragma: no cover - runs where a GPU is
    top, hf = lm_config(files, tmp_path, rounds=2, strategy="fedit")  # dense uploads: the same bits
    cpu = run(RunConfig(**top, hf=hf), progress=False)
    top["out"] = str(tmp_path / "gpu")
    gpu = run(RunConfig(**top, device="cuda", dtype="bfloat16", hf=hf), progress=False)
    assert [c["uplink_bits"] for c in gpu.clients] == [c["uplink_bits"] for c in cpu.clients]
    assert gpu.rounds[-1]["test_loss"] == pytest.approx(cpu.rounds[-1]["test_loss"], rel=0.05)


def test_register_task_runs_a_task_a_config_cannot_express(tmp_path):
    with pytest.raises(ValueError, match="must be one of"):
        RunConfig(task="my-linear")
    register_task("my-linear", lambda cfg: LinearTask(cfg))
    try:
        cfg = RunConfig(task="my-linear", rounds=1, clients=2, rank=2, keep=1, out=str(tmp_path / "run"),
                        linear={"dim": 8, "samples": 16, "test_samples": 32})
        h = run(cfg, progress=False)
        assert h.config["task"] == "my-linear" and np.isfinite(h.rounds[0]["test_loss"])
    finally:
        REGISTERED_TASKS.pop("my-linear")
    with pytest.raises(ValueError, match="built-in"):
        register_task("linear", lambda cfg: None)


def test_other_data_sources_and_splits(files, tmp_path, monkeypatch):
    """A Parquet file, a module:function, a held-out test file, and the three client splits."""
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow

    rows = list(csv.DictReader(open(files / "reviews.csv", encoding="utf-8")))
    pq.write_table(pyarrow.Table.from_pylist(rows[:200]), tmp_path / "train.parquet")
    (tmp_path / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[200:]))
    (tmp_path / "mydata.py").write_text(
        "def splits():\n    return {'train': {'text': ['a good film'] * 30 + ['a bad one'] * 30,"
        " 'label': [1] * 30 + [0] * 30}}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    top, hf = cls_config(files, tmp_path, clients=4)
    parquet, held_out = str(tmp_path / "train.parquet"), {"test_dataset": str(tmp_path / "test.jsonl")}
    for source, split, extra in ((parquet, "iid", held_out), ("mydata:splits", "dirichlet", {})):
        h = {**hf, "dataset": source, "client_split": split, "split_column": None, **extra}
        task = make_task(RunConfig(**top, hf={k: v for k, v in h.items() if v is not None}))
        train = np.concatenate(task.client_indices)
        assert len(task.client_indices) == 4 and len(np.unique(train)) == len(train)
        assert not set(train) & set(task.test_indices)
        if extra:
            assert list(task.test_indices) == list(range(200, 240))
        assert list(task.classes) == (["fresh", "rotten"] if extra else [0, 1])
    column = make_task(RunConfig(**top, hf=hf))  # by movie: no movie on two clients
    movies = [{rows[i]["movie"] for i in part} for part in column.client_indices]
    assert all(not (a & b) for i, a in enumerate(movies) for b in movies[i + 1:])


def test_callbacks_get_every_row_and_tensorboard_reads_them(tmp_path):
    tb = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    from fedloop import TensorBoardWriter

    rows = []
    cfg = RunConfig(task="linear", rounds=2, clients=2, rank=2, keep=1, out=str(tmp_path / "run"),
                    linear={"dim": 8, "samples": 16, "test_samples": 32})
    h = run(cfg, progress=False, callbacks=[rows.append, TensorBoardWriter(tmp_path / "tb")])
    assert [r["round"] for r in rows] == [1, 2]
    assert [r["uplink_bits"] for r in rows] == [r["uplink_bits"] for r in h.rounds]
    events = tb.EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    written = events.Scalars("ledger/uplink_bits")
    assert [(e.step, e.value) for e in written] == [(r["round"], float(r["uplink_bits"])) for r in h.rounds]
    assert "ledger/accuracy" not in events.Tags()["scalars"]  # NaN columns are left out
    with pytest.raises(ValueError, match="callbacks"):
        run(cfg, callbacks=[1])


def test_flower_run_config_names_an_hf_task(files):
    fl = pytest.importorskip("fedloop.flower")
    cfg, _ = fl.config_from_run_config({
        "task": "hf-causal-lm", "rank": 4, "keep": 2, "max-length": 16, "out": "/tmp/unused",
        "hf.model": str(files / "llama"), "hf.dataset": str(files / "qa.jsonl"), "hf.prompt-column": "prompt",
        "hf.target-modules": "q_proj,o_proj", "hf.head": "", "hf.tokenizer": "none", "device": "auto"})
    assert cfg.hf["target_modules"] == "q_proj,o_proj" and cfg.hf["tokenizer"] is None
    task = make_task(cfg)
    assert {n.rsplit(".", 1)[-1] for n in task.factors()} == {"q_proj", "o_proj"} and task.head() == {}


def test_gpt2_conv1d_shapes_and_fold(tmp_path):
    """GPT-2 stores c_attn transposed (Conv1D): the shape reads peft's out × in, and fold adds
    the m × n update the right way round."""
    tok = transformers.AutoTokenizer.from_pretrained(str(fd.minilm_path()), local_files_only=True)
    gpt2 = transformers.AutoModelForCausalLM.from_config(transformers.GPT2Config(
        vocab_size=len(tok), n_embd=32, n_layer=1, n_head=2, n_positions=64, bos_token_id=101, eos_token_id=102))
    gpt2.save_pretrained(tmp_path / "gpt2")
    tok.save_pretrained(tmp_path / "gpt2")
    (tmp_path / "d.csv").write_text("text\n" + "".join(f"review number {i} is fine\n" for i in range(20)))
    cfg = RunConfig(task="hf-causal-lm", rank=4, keep=2, clients=2, max_length=12, out=str(tmp_path / "run"),
                    hf={"model": str(tmp_path / "gpt2"), "dataset": str(tmp_path / "d.csv")})
    task = make_task(cfg)
    shape = LoraShape.from_model(task.model)
    assert [(m.name, m.out_features, m.in_features) for m in shape.modules] == [("transformer.h.0.attn.c_attn", 96, 32)]
    assert shape == soft.shape_of(task.factors())
    name = shape.modules[0].name
    weight = task._adapted[name].base_layer.weight  # Conv1D: in × out
    before = weight.detach().clone()
    delta = torch.randn(96, 32)
    task.fold(name, delta)
    assert torch.allclose(weight.detach() - before, delta.T)


def test_resume_repeats_an_uninterrupted_run(files, tmp_path):
    top, hf = cls_config(files, tmp_path, strategy="tsfa", checkpoint_every=1)
    whole = run(RunConfig(**top, hf=hf), progress=False)
    top["out"] = str(tmp_path / "resumed")
    run(RunConfig(**{**top, "rounds": 1}, hf=hf), progress=False)
    resumed = run(RunConfig(**top, hf=hf), resume=True, progress=False)
    assert [c["uplink_bits"] for c in resumed.clients] == [c["uplink_bits"] for c in whole.clients]
    assert [r["test_loss"] for r in resumed.rounds] == [r["test_loss"] for r in whole.rounds]


def test_benchmark_takes_an_hf_config(files, tmp_path, capsys):
    top, hf = lm_config(files, tmp_path, rounds=1, clients=2)
    out = tmp_path / "bench"
    argv = ["benchmark", toml(tmp_path / "b.toml", hf, **top), "--strategies", "fedit", "tsfa", "--seeds", "1",
            "--out", str(out), "--quiet"]
    assert main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert "final test loss" in capsys.readouterr().out and "tsfa" in json.dumps(summary)


def test_design_takes_an_hf_config(files, tmp_path, capsys):
    """The offline plan on a user's own model: the pilot trains the hf task, the plan table
    covers the ranks asked for, and the payload bits come from the model's adapted modules."""
    top, hf = cls_config(files, tmp_path, rounds=4, out=str(tmp_path / "plan"))
    argv = ["design", toml(tmp_path / "d.toml", hf, **top), "--pilot-rounds", "3", "--ranks", "2", "4",
            "--draws", "20", "--quiet"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "rank" in out and "*" in out
    plan = json.loads((tmp_path / "plan" / "plan.json").read_text())
    assert plan["status"] in ("optimal", "feasible") and plan["rank"] in (2, 4)
    with open(tmp_path / "plan" / "plan.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert {int(r["rank"]) for r in rows} == {2, 4}
    task = make_task(RunConfig(**top, hf=hf))  # rank 4, the config's
    shape, head_bits = LoraShape.from_model(task.model), 32 * sum(p.numel() for p in task.head().values())
    assert head_bits > 0  # the classifier travels with every upload
    for r in rows:
        if int(r["rank"]) == 4:
            assert int(r["payload_bits"]) == shape.payload_bits(int(r["keep"])) + head_bits
