"""Training stack: data shards and loader, optimizer split and schedule, checkpoints, exact resume,
divergence handling, generation, DDP on gloo."""

import gzip
import json
import math
import os
import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from model import Hyla, get_config
from train import checkpoint
from train.cli import main as cli_main
from train.data import (
    EMBEDDED_CORPUS,
    BatchSampler,
    TokenData,
    prepare,
    read_documents,
    split_documents,
    token_dtype,
)
from train.generate import generate, sample_next
from train.optim import Muon, build_optimizers, lr_multiplier, set_lr, split_params
from train.trainer import TrainArgs, TrainingDiverged, train


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Six short documents from the embedded corpus as a FineWeb-style jsonl file."""
    docs = [json.loads(line)["text"][:20000] for line in gzip.open(EMBEDDED_CORPUS, "rt")][:6]
    path = tmp_path_factory.mktemp("corpus") / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(docs)))
    return path, docs


@pytest.fixture(scope="module")
def data_dir(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("data")
    prepare(out, corpus[0], vocab_size=400, val_docs=2)
    return out


def small_args(data_dir, out, **kw) -> TrainArgs:
    base = dict(
        preset="tiny", data=str(data_dir), out=str(out), steps=6, batch_size=4, seq_len=32, warmup=2,
        eval_every=3, eval_tokens=256, ckpt_every=100, log_every=1, progress=False, device="cpu",
    )  # fmt: skip
    return TrainArgs(**{**base, **kw})


# ----------------------------------------------------------------------------- data


def test_shards_and_manifest(corpus, data_dir):
    _, docs = corpus
    data = TokenData(data_dir)
    m = data.manifest
    assert m["dtype"] == "uint16" and m["tokenizer"]["vocab_size"] == 400
    splits = split_documents(docs, 2)
    tok = data.tokenizer
    for split, texts in splits.items():
        ids = np.asarray(data.splits[split])
        assert m["splits"][split]["tokens"] == len(ids) and m["splits"][split]["documents"] == len(texts)
        assert m["splits"][split]["bytes"] == sum(len(t.encode()) for t in texts)
        # one BOS and one EOS per document (not per line), and the ids decode back to the documents
        assert (ids == tok.bos_id).sum() == len(texts) == (ids == tok.eos_id).sum()
        bounds = np.flatnonzero(ids == tok.bos_id).tolist() + [len(ids)]
        decoded = [tok.decode(ids[a + 1 : b - 1]) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
        assert decoded == texts
        # the per-token byte table accounts for every byte (one dummy-prefix space per document)
        assert tok.token_bytes[ids].sum() == m["splits"][split]["bytes"] + len(texts)
    assert 0 < data.unigram_bpb() < 8


def test_given_tokenizer_and_dtypes(tmp_path, data_dir, corpus):
    m = prepare(tmp_path, corpus[0], tokenizer=data_dir / "tokenizer.model", val_docs=2)
    assert m["tokenizer"]["sha256"] == TokenData(data_dir).tokenizer.sha256
    assert np.array_equal(TokenData(tmp_path).splits["val"], TokenData(data_dir).splits["val"])
    assert token_dtype(32000) == np.uint16 and token_dtype(65536) == np.uint16 and token_dtype(65537) == np.uint32


def test_32k_tokenizer_path(tmp_path, corpus):
    """A 32000-piece SentencePiece model in the Llama 2 layout (shipped by mistral-common) works as given."""
    import importlib.util

    spec = importlib.util.find_spec("mistral_common")
    if spec is None:
        pytest.skip("mistral-common is not installed (.ci/run installs it for this test)")
    model = os.path.join(spec.submodule_search_locations[0], "data", "tokenizer.model.v1")
    m = prepare(tmp_path, corpus[0], tokenizer=model, val_docs=2)
    assert m["tokenizer"]["vocab_size"] == 32000 and m["dtype"] == "uint16"
    data = TokenData(tmp_path)
    assert (data.tokenizer.bos_id, data.tokenizer.eos_id) == (1, 2)
    assert data.tokenizer.decode(data.splits["train"][1:30]) in corpus[1][0]


def test_read_documents_formats(tmp_path):
    (tmp_path / "a.txt").write_text("first document\nwith two lines")
    with gzip.open(tmp_path / "b.jsonl.gz", "wt") as fh:
        fh.write(json.dumps({"text": "second"}) + "\n\n" + json.dumps({"text": "third"}) + "\n")
    assert list(read_documents(tmp_path)) == ["first document\nwith two lines", "second", "third"]
    with pytest.raises(FileNotFoundError):
        list(read_documents(tmp_path / "missing"))
    (tmp_path / "c.jsonl").write_text(json.dumps({"content": "x"}) + "\n")
    with pytest.raises(ValueError, match="no 'text' field"):
        list(read_documents(tmp_path / "c.jsonl"))


def test_sampler_deterministic_and_sharded(data_dir):
    tokens = TokenData(data_dir).splits["train"]
    one = BatchSampler(tokens, 16, 6, seed=3)
    x, y = one.batch(5)
    assert torch.equal(x, one.batch(5)[0]) and not torch.equal(x, one.batch(6)[0])
    assert torch.equal(x[:, 1:], y[:, :-1])
    ranks = [BatchSampler(tokens, 16, 3, seed=3, rank=r, world_size=2).batch(5)[0] for r in range(2)]
    assert torch.equal(torch.cat(ranks), x)  # the ranks split one global batch


def test_missing_or_tampered_data(tmp_path, data_dir):
    with pytest.raises(FileNotFoundError, match="hyla data"):
        TokenData(tmp_path)
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in data_dir.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    with open(bad / "train_000.bin", "ab") as fh:
        fh.write(b"\0\0")
    with pytest.raises(ValueError, match="tokens, the manifest says"):
        TokenData(bad)


# ----------------------------------------------------------------------------- optimizer


def test_param_split_95m():
    muon, decay, no_decay = split_params(Hyla(get_config("95m")))
    assert len(muon) == 132 and all(p.dim() == 2 for p in muon)  # 140 hidden matrices less 8 convs
    assert sorted(tuple(p.shape) for p in decay) == [(3024, 1, 4)] * 8 + [(32000, 576)]
    assert all(p.dim() == 1 for p in no_decay)
    assert len(Muon(muon).param_groups) == 10  # one per shape: one stacked newton_schulz call each


def test_each_group_lr_over_schedule():
    model = Hyla(get_config("tiny"))
    muon, adamw = build_optimizers(model, muon_lr=0.02, adamw_lr=0.002)
    total, warmup = 1000, 100
    for step, mult in [(0, 0.01), (49, 0.5), (99, 1.0), (100, 1.0), (550, 0.5), (999, None)]:
        expected = lr_multiplier(step, warmup, total)
        if mult is not None:
            assert math.isclose(expected, mult, rel_tol=1e-9, abs_tol=1e-12)
        set_lr([muon, adamw], expected)
        assert all(math.isclose(g["lr"], 0.02 * expected) for g in muon.param_groups)
        assert all(math.isclose(g["lr"], 0.002 * expected) for g in adamw.param_groups)
    assert lr_multiplier(999, warmup, total) < 1e-4


def test_muon_matches_per_matrix_update():
    from kernels.ns.reference import newton_schulz

    torch.manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(12, 8)) for _ in range(3)] + [torch.nn.Parameter(torch.randn(5, 9))]
    ref = [p.detach().clone() for p in ps]
    opt = Muon(ps, lr=0.1, momentum=0.9, weight_decay=0.05)
    bufs = [torch.zeros_like(p) for p in ps]
    for _ in range(2):
        grads = [torch.randn_like(p) for p in ps]
        for p, g in zip(ps, grads, strict=True):
            p.grad = g.clone()
        opt.step()
        for i, g in enumerate(grads):
            bufs[i] = 0.9 * bufs[i] + g
            o = newton_schulz(g + 0.9 * bufs[i])
            scale = max(1, ref[i].shape[0] / ref[i].shape[1]) ** 0.5
            ref[i] = ref[i] * (1 - 0.1 * 0.05) - 0.1 * scale * o
    for p, r in zip(ps, ref, strict=True):
        assert torch.allclose(p, r, atol=1e-5)


# ----------------------------------------------------------------------------- training, checkpoints


def read_log(out):
    return [json.loads(line) for line in open(out / "log.jsonl")]


def test_resume_is_bit_exact(tmp_path, data_dir):
    straight, _ = train(small_args(data_dir, tmp_path / "a"))
    train(small_args(data_dir, tmp_path / "b", stop_after=3))
    resumed, _ = train(small_args(data_dir, tmp_path / "b", resume=True))
    loss_a = [r["loss"] for r in read_log(tmp_path / "a") if "loss" in r]
    loss_b = [r["loss"] for r in read_log(tmp_path / "b") if "loss" in r]
    assert len(loss_a) == 6 and loss_a == loss_b
    for (n, a), b in zip(straight.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), n
    ckpt = checkpoint.load(tmp_path / "b" / "ckpt.pt")
    assert ckpt["step"] == 6 and ckpt["tokenizer"]["vocab_size"] == 400
    assert {"val_loss", "val_bpb"} <= set(read_log(tmp_path / "a")[-1])


def test_checkpoint_errors(tmp_path, data_dir):
    out = tmp_path / "run"
    train(small_args(data_dir, out, steps=2))
    path = out / "ckpt.pt"
    good = path.read_bytes()
    assert checkpoint.load(path)["step"] == 2
    (tmp_path / "truncated.pt").write_bytes(good[: len(good) // 2])
    with pytest.raises(checkpoint.CheckpointError, match="corrupt or truncated"):
        checkpoint.load(tmp_path / "truncated.pt")
    flipped = bytearray(good)
    flipped[len(good) // 2] ^= 0x10
    (tmp_path / "flipped.pt").write_bytes(bytes(flipped))
    with pytest.raises(checkpoint.CheckpointError, match="corrupt or truncated"):
        checkpoint.load(tmp_path / "flipped.pt")
    (tmp_path / "other.pt").write_bytes(b"not a checkpoint at all" * 4)
    with pytest.raises(checkpoint.CheckpointError, match="not a hyla checkpoint"):
        checkpoint.load(tmp_path / "other.pt")
    with pytest.raises(FileNotFoundError):
        checkpoint.load(tmp_path / "missing.pt")
    # resuming into another model config is refused with the differing fields named
    with pytest.raises(checkpoint.CheckpointError, match="another model config"):
        train(small_args(data_dir, out, preset="95m", seq_len=32, resume=True, steps=3))
    assert not list(out.glob("*.tmp"))


def test_divergence_keeps_last_good_checkpoint(tmp_path, data_dir):
    out = tmp_path / "run"
    train(small_args(data_dir, out, steps=2))
    before = (out / "ckpt.pt").read_bytes()
    with pytest.raises(TrainingDiverged, match="last good checkpoint"):
        train(small_args(data_dir, out, steps=8, resume=True, muon_lr=1e30, adamw_lr=1e30, warmup=1))
    assert (out / "ckpt.pt").read_bytes() == before


def test_cli_train_and_generate(tmp_path, data_dir, capsys):
    out = tmp_path / "cli"
    rc = cli_main(["train", "--data", str(data_dir), "--out", str(out), "--steps", "2", "--seq-len", "32",
                   "--batch-size", "2", "--eval-tokens", "64", "--warmup", "1", "--no-progress"])  # fmt: skip
    assert rc == 0 and "val_bpb" in capsys.readouterr().out
    rc = cli_main(["generate", "--ckpt", str(out / "ckpt.pt"), "--prompt", "KING", "--max-new-tokens", "5",
                   "--seed", "1", "--device", "cpu"])  # fmt: skip
    assert rc == 0 and capsys.readouterr().out.startswith("KING")


# ----------------------------------------------------------------------------- generation


def test_greedy_generation_matches_full_forward():
    torch.manual_seed(0)
    model = Hyla(get_config("tiny", vocab_size=64, max_seq_len=96)).double().eval()
    prompt = torch.randint(0, 64, (2, 11))
    new = generate(model, prompt, 20, temperature=0)
    seq = prompt
    for _ in range(20):
        seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(new, seq[:, 11:])
    assert generate(model, torch.randint(0, 64, (1, 90)), 50, temperature=0).shape[1] == 6  # context bound


def test_top_p_sampling():
    logits = torch.tensor([[0.0, 3.0, 2.9, -5.0]])
    gen = torch.Generator().manual_seed(0)
    draws = {int(sample_next(logits, 1.0, 0.5, gen)) for _ in range(200)}
    assert draws == {1}  # the top token alone holds >= 50% of the mass
    draws = {int(sample_next(logits, 1.0, 0.9, gen)) for _ in range(200)}
    assert draws == {1, 2}


# ----------------------------------------------------------------------------- distributed


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world, port, data_dir, out, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    model, _ = train(small_args(data_dir, out, steps=3, batch_size=2, eval_every=100))
    results[rank] = {k: v.clone() for k, v in model.state_dict().items()}
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_ddp_gloo_matches_single_process(tmp_path, data_dir):
    manager = mp.Manager()
    results = manager.dict()
    mp.spawn(_ddp_worker, args=(2, _free_port(), data_dir, tmp_path / "ddp", results), nprocs=2, join=True)
    single, _ = train(small_args(data_dir, tmp_path / "single", steps=3, batch_size=4, eval_every=100))
    r0, r1 = results[0], results[1]
    for name, p in single.state_dict().items():
        assert torch.equal(r0[name], r1[name]), name  # ranks stay identical
        assert torch.allclose(r0[name], p, rtol=1e-4, atol=1e-5), name  # = one process, same global batch
