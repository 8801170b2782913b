"""C/OpenMP inference (csrc/): exporter, loader checks, logits parity with the PyTorch model, int8
perplexity, greedy generation, the tokenizer against SentencePiece, and the `run` program.

The engine is built once per session with cmake (portable flags, as in CI) into a temporary directory.
Engines run on one thread here (CI machines are small and shared); `run -T 2` checks the threaded path.
"""

import gzip
import importlib.util
import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from model import Hyla, get_config
from train.cli import main as cli_main
from train.data import EMBEDDED_CORPUS, TokenData, Tokenizer, prepare
from train.export import ENTRY, HEADER, HEADER_BYTES, expected_tensors, export_model, export_tokenizer
from train.generate import generate
from train.trainer import TrainArgs, train

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def build(tmp_path_factory) -> Path:
    """cmake configure + build of `run` and the pyhyla module; the module is importable afterwards."""
    import pybind11

    out = tmp_path_factory.mktemp("cbuild")
    flags = [f"-Dpybind11_DIR={pybind11.get_cmake_dir()}", f"-DPython3_EXECUTABLE={sys.executable}"]
    subprocess.run(["cmake", "-S", str(ROOT), "-B", str(out), "-DCMAKE_BUILD_TYPE=Release", *flags], check=True)
    subprocess.run(["cmake", "--build", str(out), "-j", str(os.cpu_count() or 1)], check=True)
    sys.path.insert(0, str(out))
    return out


@pytest.fixture(scope="session")
def pyhyla(build):
    import pyhyla

    return pyhyla


def random_model(preset: str, seed: int = 0) -> Hyla:
    """Random weights with the zero/one-initialized vectors (norms, hyper-connection scales) randomized too,
    so every (1 + w) and scale path is exercised."""
    torch.manual_seed(seed)
    model = Hyla(get_config(preset)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.2 * torch.randn_like(p))
    return model


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """A tiny model trained briefly on part of the embedded corpus: (checkpoint path, data dir)."""
    root = tmp_path_factory.mktemp("trained")
    docs = [json.loads(line)["text"][:20000] for line in gzip.open(EMBEDDED_CORPUS, "rt")][:6]
    (root / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    prepare(root / "data", root / "docs.jsonl", vocab_size=512, val_docs=2)
    args = TrainArgs(
        preset="tiny", data=str(root / "data"), out=str(root / "run"), steps=60, batch_size=8, seq_len=64, warmup=6,
        eval_every=60, eval_tokens=1024, ckpt_every=60, log_every=20, progress=False, device="cpu",
    )  # fmt: skip
    train(args)
    return root / "run" / "ckpt.pt", root / "data"


@pytest.fixture(scope="session")
def exported(trained, tmp_path_factory):
    """`hyla export` of the trained checkpoint, fp32 and int8 (tokenizer.bin beside them)."""
    ckpt, _ = trained
    out = tmp_path_factory.mktemp("export")
    assert cli_main(["export", "--ckpt", str(ckpt), "--out", str(out / "model.bin")]) == 0
    assert cli_main(["export", "--ckpt", str(ckpt), "--out", str(out / "model8.bin"), "--quant", "int8"]) == 0
    return out


def rel_max_diff(a: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(a - ref).max() / np.abs(ref).max())


# ----------------------------------------------------------------------------- parity


@pytest.mark.parametrize("preset,T", [("tiny", 160), ("95m", 110)])
def test_logits_match_pytorch(pyhyla, tmp_path, preset, T):
    """fp32 logits of one-token decoding and of the batched prefill vs the PyTorch model, T positions
    (past the CSA window of 64 and many compression blocks)."""
    model = random_model(preset)
    idx = torch.randint(0, model.cfg.vocab_size, (1, T), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(idx)[0].numpy()
        cache = model.new_cache()
        ref_inc = torch.cat([model(idx[:, : T // 2], cache=cache), model(idx[:, T // 2 :], cache=cache)], 1)[0].numpy()
    assert rel_max_diff(ref_inc, ref) < 1e-5  # the PyTorch caches agree with the full forward
    export_model(model.state_dict(), model.cfg, tmp_path / "m.bin")
    eng = pyhyla.Engine(str(tmp_path / "m.bin"), threads=1)
    assert eng.config["layer_types"] == [{"gdn": 0, "csa": 1, "full": 2}[k] for k in model.cfg.layer_types]
    decoded = np.stack([eng.forward(int(t)) for t in idx[0]])
    assert eng.pos == T
    assert rel_max_diff(decoded, ref) < 1e-4
    eng.reset()
    prefill = eng.prefill(idx[0].tolist(), all_logits=True)  # chunks of 64 tokens
    assert rel_max_diff(prefill, ref) < 1e-4
    eng.reset()  # a prefill then decoding continues the same sequence
    eng.prefill(idx[0, :70].tolist())
    assert rel_max_diff(eng.forward(int(idx[0, 70])), ref[70]) < 1e-4
    if preset == "tiny":  # the portable kernels (what CPUs without AVX-512 run)
        os.environ["HYLA_PORTABLE"] = "1"
        try:
            portable = pyhyla.Engine(str(tmp_path / "m.bin"), threads=1)
        finally:
            del os.environ["HYLA_PORTABLE"]
        assert rel_max_diff(portable.prefill(idx[0].tolist(), all_logits=True), ref) < 1e-4


def nll(logits: np.ndarray, targets: np.ndarray) -> float:
    logits = logits.astype(np.float64)
    lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    return float((lse - logits[np.arange(len(targets)), targets]).mean())


def test_int8_perplexity_within_2_percent(pyhyla, trained, exported):
    """Perplexity on the validation text: C int8 within 2% of C fp32, which equals PyTorch's."""
    ckpt, data_dir = trained
    val = np.asarray(TokenData(data_dir).splits["val"][:256], dtype=np.int64)
    model, _ = load_trained(ckpt)
    with torch.no_grad():
        ref = model(torch.from_numpy(val[None, :-1]))[0].numpy()
    ppl, logits8 = {}, None
    for name in ("model.bin", "model8.bin", "portable"):
        if name == "portable":  # the int8 kernel of CPUs without AVX-512 VNNI (same integer products)
            os.environ["HYLA_PORTABLE"] = "1"
        try:
            eng = pyhyla.Engine(str(exported / name.replace("portable", "model8.bin")), threads=1)
        finally:
            os.environ.pop("HYLA_PORTABLE", None)
        assert eng.config["quantized"] == (name != "model.bin")
        logits = eng.prefill(val[:-1].tolist(), all_logits=True)
        ppl[name] = np.exp(nll(logits, val[1:]))
        logits8 = logits if name == "model8.bin" else logits8
    # float summation order differs, which can flip a rounding of the next layer's activations
    assert abs(ppl["portable"] / ppl["model8.bin"] - 1) < 2e-3
    # int8 decoding one token at a time on 2 threads (rows split between threads in whole blocks) agrees
    # with the 1-thread prefill
    eng = pyhyla.Engine(str(exported / "model8.bin"), threads=2)
    eng.prefill(val[:40].tolist())
    decoded = np.stack([eng.forward(int(t)) for t in val[40:72]])
    assert rel_max_diff(decoded, logits8[40:72]) < 1e-3
    ppl_torch = np.exp(nll(ref, val[1:]))
    assert abs(ppl["model.bin"] / ppl_torch - 1) < 1e-4
    print(f"perplexity: torch {ppl_torch:.4f}, C fp32 {ppl['model.bin']:.4f}, C int8 {ppl['model8.bin']:.4f}")
    assert abs(ppl["model8.bin"] / ppl["model.bin"] - 1) < 0.02, ppl


def load_trained(ckpt):
    from train.cli import load_model

    return load_model(str(ckpt))


def test_greedy_generation_matches_pytorch(pyhyla, trained, exported):
    model, tok = load_trained(trained[0])
    prompt = tok.encode("ROMEO:", bos=True)
    want = generate(model, torch.tensor([prompt]), 80, temperature=0.0)[0].tolist()
    eng = pyhyla.Engine(str(exported / "model.bin"), threads=1)
    assert eng.generate(prompt, 80, temperature=0.0) == want
    # sampling is reproducible per seed and stays in the vocabulary
    eng.reset()
    a = eng.generate(prompt, 30, temperature=0.9, top_p=0.9, seed=7)
    eng.reset()
    assert a == eng.generate(prompt, 30, temperature=0.9, top_p=0.9, seed=7)
    assert all(0 <= t < tok.vocab_size for t in a)


# ----------------------------------------------------------------------------- tokenizer


def sample_texts() -> list[str]:
    doc = json.loads(gzip.open(EMBEDDED_CORPUS, "rt").readline())["text"]
    lines = [line for line in doc.split("\n") if line][:150]
    extra = ["", " ", "  two  spaces  ", "héllo wörld ✓ 漢字 🙂", "tab\there\nnewline\n\n", "[INST] hi [/INST]"]
    return lines + extra + [doc[:4000]]


def check_tokenizer(pyhyla, model_path, tmp_path):
    sp = Tokenizer(model_path)
    export_tokenizer(model_path, tmp_path / "tok.bin")
    ct = pyhyla.Tokenizer(str(tmp_path / "tok.bin"))
    assert (ct.vocab_size, ct.bos_id, ct.eos_id) == (sp.vocab_size, sp.bos_id, sp.eos_id)
    for text in sample_texts():
        ids = sp.encode(text, bos=True)
        assert ct.encode(text, bos=True) == ids, text[:60]
        assert ct.decode(ids).decode("utf-8") == sp.decode(ids)


def test_tokenizer_matches_sentencepiece(pyhyla, trained, tmp_path):
    check_tokenizer(pyhyla, trained[1] / "tokenizer.model", tmp_path)
    good = (tmp_path / "tok.bin").read_bytes()
    rng = np.random.default_rng(0)
    bad = [good[:cut] for cut in (0, 20, 41, len(good) // 2, len(good) - 1)]
    for pos in rng.integers(0, len(good), 20):
        flipped = bytearray(good)
        flipped[pos] ^= 1 << int(rng.integers(8))
        bad.append(bytes(flipped))
    for blob in bad:
        (tmp_path / "bad.bin").write_bytes(blob)
        with pytest.raises(ValueError):
            pyhyla.Tokenizer(str(tmp_path / "bad.bin"))


def test_tokenizer_llama2_layout_32k(pyhyla, tmp_path):
    spec = importlib.util.find_spec("mistral_common")
    if spec is None:
        pytest.skip("mistral-common is not installed (.ci/run installs it for its 32000-piece tokenizer)")
    check_tokenizer(pyhyla, os.path.join(spec.submodule_search_locations[0], "data", "tokenizer.model.v1"), tmp_path)


# ----------------------------------------------------------------------------- run


def run(build, *args, stdin=None, env=None):
    return subprocess.run(
        [str(build / "run"), *map(str, args)], capture_output=True, text=True, input=stdin, timeout=120,
        env={**os.environ, "OMP_WAIT_POLICY": "passive", **(env or {})},
    )  # fmt: skip


def test_run_generates_what_pytorch_generates(build, trained, exported):
    model, tok = load_trained(trained[0])
    prompt = "JULIET: O Romeo"
    want = generate(model, torch.tensor([tok.encode(prompt, bos=True)]), 40, temperature=0.0)[0].tolist()
    text = prompt + tok.decode(want[: want.index(tok.eos_id)] if tok.eos_id in want else want)
    for threads in (1, 2):
        r = run(build, exported / "model.bin", "-i", prompt, "-n", 40, "-t", 0, "-T", threads)
        assert r.returncode == 0, r.stderr
        assert r.stdout == text + "\n" and "tok/s" in r.stderr  # run ends with a newline
    r = run(build, exported / "model8.bin", "-i", prompt, "-n", 40, "-t", 0.8, "-s", 3)
    assert r.returncode == 0 and r.stdout.startswith(prompt), r.stderr
    chat = run(build, exported / "model.bin", "-m", "chat", "-y", "Be brief.", "-n", 20, stdin="Hello\nAnd then?\n")
    assert chat.returncode == 0 and chat.stdout.count("Assistant:") == 2, chat.stderr


def test_run_rejects_bad_input(build, exported, tmp_path):
    r = run(build, tmp_path / "missing.bin", "-i", "x")
    assert r.returncode == 1 and "cannot open" in r.stderr
    r = run(build, exported / "model.bin", "-i", "word " * 400)  # more tokens than the 256 context
    assert r.returncode == 1 and "context" in r.stderr
    r = run(build, exported / "model.bin", "-z", tmp_path / "none.bin")
    assert r.returncode == 1 and "cannot open" in r.stderr
    assert run(build, exported / "model.bin", "-t", "hot").returncode == 1


# ----------------------------------------------------------------------------- loader and input checks


def rewrite_header(blob: bytearray, n_tensors: int) -> None:
    """Recompute the header CRC after an edit of header or table."""
    start = -(-(HEADER_BYTES + n_tensors * ENTRY.itemsize) // 64) * 64
    at = HEADER.fields["header_crc"][1]
    blob[at : at + 4] = bytes(4)
    blob[at : at + 4] = struct.pack("<I", zlib.crc32(bytes(blob[:start])))


def test_loader_rejects_bad_files(pyhyla, tmp_path):
    model = random_model("tiny")
    path = tmp_path / "m.bin"
    export_model(model.state_dict(), model.cfg, path)
    good = bytearray(path.read_bytes())
    n = len(expected_tensors(model.cfg))
    bad = tmp_path / "bad.bin"

    def load_error(blob) -> str:
        bad.write_bytes(bytes(blob))
        with pytest.raises(ValueError) as e:
            pyhyla.Engine(str(bad))
        return str(e.value)

    with pytest.raises(ValueError, match="cannot open"):
        pyhyla.Engine(str(tmp_path / "missing.bin"))
    assert "bad magic" in load_error(b"GGUF" + good[4:])
    v = bytearray(good)
    v[8:12] = struct.pack("<I", 2)
    assert "format version 2" in load_error(v)
    for cut in (0, 100, HEADER_BYTES + 50, len(good) // 2, len(good) - 1):
        assert "truncated" in load_error(good[:cut]) or "corrupt" in load_error(good[:cut])
    rng = np.random.default_rng(0)
    for pos in [*rng.integers(0, HEADER_BYTES + n * 128, 30), *rng.integers(0, len(good), 30)]:
        flipped = bytearray(good)
        flipped[pos] ^= 1 << int(rng.integers(8))
        load_error(flipped)  # every flipped bit is caught (header, table, data or padding)
    # a table whose names or shapes do not match the config, with valid checksums
    table = np.frombuffer(bytes(good[HEADER_BYTES : HEADER_BYTES + n * 128]), ENTRY).copy()
    names = [e.decode() for e in table["name"]]
    i = names.index("layers.2.mixer.compress_k.weight")
    for edit, message in [("name", "compress_k.weight is missing"), ("shape", "has shape")]:
        t = table.copy()
        if edit == "name":
            t["name"][i] = b"layers.2.mixer.compress_q.weight"
        else:
            t["shape"][i][0] += 1
        blob = bytearray(good)
        blob[HEADER_BYTES : HEADER_BYTES + n * 128] = t.tobytes()
        rewrite_header(blob, n)
        assert message in load_error(blob)
    pyhyla.Engine(str(path))  # the untouched file still loads


def test_exporter_refuses_incomplete_state(tmp_path):
    model = random_model("tiny")
    state = model.state_dict()
    del state["layers.0.attn_residual_scale"]
    with pytest.raises(ValueError, match="attn_residual_scale"):
        export_model(state, model.cfg, tmp_path / "m.bin")
    state = model.state_dict()
    state["layers.2.mixer.blend_gate.weight"] = state["layers.2.mixer.blend_gate.weight"][:-1]
    with pytest.raises(ValueError, match="blend_gate"):
        export_model(state, model.cfg, tmp_path / "m.bin")
    with pytest.raises(ValueError, match="quant"):
        export_model(model.state_dict(), model.cfg, tmp_path / "m.bin", quant="int4")


def test_forward_rejects_bad_tokens(pyhyla, tmp_path):
    model = random_model("tiny")
    export_model(model.state_dict(), model.cfg, tmp_path / "m.bin")
    eng = pyhyla.Engine(str(tmp_path / "m.bin"), threads=1)
    for ids in ([model.cfg.vocab_size], [-1], [3, 2048, 4]):
        with pytest.raises(ValueError, match="out of range"):
            eng.prefill(ids)
    with pytest.raises(ValueError, match="context"):
        eng.prefill([1] * (model.cfg.max_seq_len + 1))
    with pytest.raises(ValueError, match="no tokens"):
        eng.prefill([])
    assert eng.pos == 0  # nothing was consumed
    eng.prefill([1] * model.cfg.max_seq_len)
    with pytest.raises(ValueError, match="context"):
        eng.forward(1)


def test_read_bandwidth_probe(pyhyla):
    """The benchmark's read-bandwidth reference (a parallel read of huge pages) returns a plausible rate."""
    for threads in (1, 2):
        assert 0.1 < pyhyla.read_bandwidth(threads=threads, mib=16, passes=2) < 1e4
