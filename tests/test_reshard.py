"""``reshard``: bitwise round trips, metaseq's part format, strict loading, the CLI, and every
bad input of issue 2 (each: exit status, a message naming the file, nothing half-written, the
input unchanged). Expected per-rank tensors are cut by hand from metaseq's layout table (split_rules' docstring), not
with ``split_rules``, so the resharder is checked against an independent reference.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from opt_serving import tensor_parallel
from opt_serving.testing import synthetic
from opt_serving.config import get_preset
from opt_serving.model import Comm, OPTModel
from reshard.cli import main
from reshard.core import reshard
from reshard.inspect import inspect_path
from reshard.verify import verify
from paths import ASSETS

ROOT = Path(__file__).resolve().parents[1]
KEYS = {"model", "cfg", "optimizer_history", "extra_state", "args"}


# -- helpers --------------------------------------------------------------------------------

def expected_part(state: dict, r: int, m: int) -> dict:
    """Rank r of m, sliced by hand: vocab / fc1 rows, out_proj / fc2 columns, qkv per third."""
    out = {}
    for name, t in state.items():
        if "qkv_proj" in name:
            d = t.shape[0] // 3  # global [K; V; Q]: each third is (D, ...)
            k, v, q = t[:d], t[d:2 * d], t[2 * d:]
            rows = slice(r * d // m, (r + 1) * d // m)
            out[name] = torch.cat([k[rows], v[rows], q[rows]])  # per-rank [K_r; V_r; Q_r]
        elif "embed_tokens" in name or ".fc1." in name:
            n = t.shape[0]
            out[name] = t[r * n // m:(r + 1) * n // m]
        elif name.endswith(("out_proj.weight", "fc2.weight")):
            n = t.shape[1]
            out[name] = t[:, r * n // m:(r + 1) * n // m]
        else:
            out[name] = t
    return out


def load(path, mmap: bool = True) -> dict:
    """What metaseq-style consumers do: plain torch.load, no custom unpickler."""
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(path, weights_only=True, mmap=mmap)


def part(folder, r: int) -> Path:
    return Path(folder) / f"reshard-model_part-{r}.pt"


def assert_state_equal(got: dict, want: dict) -> None:
    assert list(got) == list(want)
    for name, t in want.items():
        assert got[name].dtype == t.dtype and torch.equal(got[name], t), name


def snapshot(root: Path) -> dict:
    """Every file and folder below root (hidden ones too) with its sha256."""
    return {str(p.relative_to(root)): (hashlib.sha256(p.read_bytes()).hexdigest()
                                       if p.is_file() else "dir")
            for p in sorted(root.rglob("*"))}


def cli(capsys, *argv) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def refused(capsys, root: Path, *argv, names, says=(), rc=2) -> str:
    """Run the CLI on bad input: exit status, one-paragraph message, nothing changed on disk."""
    before = snapshot(root)
    code, _, err = cli(capsys, *argv, "--no-progress")
    assert code == rc, err
    assert err.startswith("reshard: error: ") and "Traceback" not in err
    assert err.count("\n") == 1, err  # one paragraph
    assert str(names) in err, err
    for text in says:
        assert text in err, err
    assert snapshot(root) == before  # input untouched, no staging folder, no partial part
    return err


@pytest.fixture
def src(tmp_path, tiny_consolidated) -> Path:
    """A private copy of the consolidated file, in its own folder."""
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copyfile(tiny_consolidated, folder / "consolidated.pt")
    return folder / "consolidated.pt"


# -- round trips ----------------------------------------------------------------------------

def test_round_trip_1_4_2_1_is_bitwise_exact(tmp_path, tiny_consolidated, tiny_state):
    reshard([str(tiny_consolidated)], 4, tmp_path / "mp4", progress=False)
    for r in range(4):
        assert_state_equal(load(part(tmp_path / "mp4", r))["model"],
                           expected_part(tiny_state, r, 4))
    reshard([str(tmp_path / "mp4")], 2, tmp_path / "mp2", progress=False)
    for r in range(2):
        assert_state_equal(load(part(tmp_path / "mp2", r))["model"],
                           expected_part(tiny_state, r, 2))
    # metaseq's virtual path <folder>/reshard.pt is accepted as input too.
    reshard([str(tmp_path / "mp2" / "reshard.pt")], 1, tmp_path / "mp1", progress=False)
    assert_state_equal(load(part(tmp_path / "mp1", 0), mmap=False)["model"], tiny_state)


def test_separate_to_fused_to_separate(tmp_path, tiny_consolidated, tiny_state):
    reshard([str(tiny_consolidated)], 2, tmp_path / "fused", progress=False)
    assert not any("q_proj" in k for k in load(part(tmp_path / "fused", 0))["model"])
    reshard([str(tmp_path / "fused")], 1, tmp_path / "sep", qkv_out="separate", progress=False)
    got = load(part(tmp_path / "sep", 0))["model"]
    assert_state_equal(got, synthetic.separate_qkv(tiny_state))
    d = tiny_state["decoder.layers.0.self_attn.qkv_proj.weight"].shape[1]
    assert torch.equal(got["decoder.layers.0.self_attn.q_proj.weight"],
                       tiny_state["decoder.layers.0.self_attn.qkv_proj.weight"][2 * d:])


def test_fsdp_shards_with_padding(tmp_path, tiny_cfg, tiny_state):
    files = synthetic.write_fsdp_shards(tmp_path / "fsdp", tiny_cfg, tiny_state, mp=2, dp=3)
    with torch.serialization.safe_globals([argparse.Namespace]):
        meta = torch.load(files[2], weights_only=False)["shard_metadata"]
    assert any(e["params"]["flat_param_0"]["padding"] for e in meta["param_metadata"])
    reshard([str(tmp_path / "fsdp")], 2, tmp_path / "mp2", progress=False)
    for r in range(2):
        ckpt = load(part(tmp_path / "mp2", r))
        assert set(ckpt) == KEYS  # shard_metadata and last_optimizer_state dropped
        assert_state_equal(ckpt["model"], expected_part(tiny_state, r, 2))
    reshard([str(tmp_path / "fsdp" / "*-shard*.pt")], 1, tmp_path / "mp1", progress=False)
    assert_state_equal(load(part(tmp_path / "mp1", 0))["model"], tiny_state)


def test_dtype_cast(tmp_path, tiny_consolidated, tiny_state):
    reshard([str(tiny_consolidated)], 1, tmp_path / "fp32", dtype="fp32", progress=False)
    got = load(part(tmp_path / "fp32", 0))["model"]
    for name, t in tiny_state.items():
        assert got[name].dtype == torch.float32 and torch.equal(got[name], t.float()), name


# -- what a part holds -----------------------------------------------------------------------

class StubComm(Comm):
    """Only the rank and size: enough for the TP pass to shape a model for one rank."""

    def __init__(self, size: int, rank: int):
        self.size, self.rank = size, rank


def test_parts_load_strictly_at_every_degree(tmp_path, tiny_cfg, tiny_consolidated):
    assert tiny_cfg.valid_mp_degrees() == [1, 2, 4, 8]
    for m in tiny_cfg.valid_mp_degrees():
        reshard([str(tiny_consolidated)], m, tmp_path / f"mp{m}", progress=False)
        for r in range(m):
            with torch.device("meta"):
                model = OPTModel(tiny_cfg)
            tensor_parallel.apply(model, StubComm(m, r))
            state = load(part(tmp_path / f"mp{m}", r))["model"]
            model.load_state_dict(state, strict=True, assign=True)  # raises on any mismatch
            assert not any(p.is_meta for p in model.state_dict().values())


def test_part_format_for_metaseq(tmp_path, tiny_consolidated, tiny_state):
    reshard([str(tiny_consolidated)], 4, tmp_path / "mp4", progress=False)
    for r in range(4):
        ckpt = load(part(tmp_path / "mp4", r))
        assert set(ckpt) == KEYS and ckpt["args"] is None
        model, cfg = ckpt["model"], ckpt["cfg"]
        assert torch.equal(model["decoder.version"], torch.tensor([3.0]))
        assert not any("output_projection" in k for k in model)
        assert cfg["model"].model_parallel_size == 4
        assert cfg["model"].use_sharded_state is True
        assert cfg["model"].criterion == "vocab_parallel_cross_entropy"
        assert cfg["common"]["model_parallel_size"] == 4
        assert {"criterion_name", "optimizer_name", "lr_scheduler_state", "num_updates"} <= set(
            ckpt["optimizer_history"][-1])
        assert "train_iterator" in ckpt["extra_state"]
        assert "last_optimizer_state" not in ckpt and "shard_metadata" not in ckpt


def test_manifest_and_assets(tmp_path, src):
    for name in ("gpt2-vocab.json", "gpt2-merges.txt"):
        shutil.copyfile(ASSETS / name, src.parent / name)
    result = reshard([str(src)], 2, tmp_path / "out", progress=False)
    out = tmp_path / "out"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["mp"] == 2 and manifest["dtype"] == "fp16"
    assert manifest["model"]["preset"] == "tiny-8h" and manifest["source"]["mp"] == 1
    assert manifest["source"]["kind"] == "separate q,k,v"
    assert [p["file"] for p in manifest["parts"]] == [part(out, r).name for r in range(2)]
    for entry in manifest["parts"]:
        data = (out / entry["file"]).read_bytes()
        assert entry["bytes"] == len(data)
        assert entry["sha256"] == hashlib.sha256(data).hexdigest()
    assert sorted(manifest["assets"]) == ["gpt2-merges.txt", "gpt2-vocab.json"]
    for name in manifest["assets"]:
        assert (out / name).read_bytes() == (ASSETS / name).read_bytes()
    assert result.parts == manifest["parts"]
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["manifest.json", "gpt2-merges.txt", "gpt2-vocab.json", part(out, 0).name,
         part(out, 1).name])
    assert verify(out, progress=False) == []


def test_inert_metaseq_objects_are_dropped(tmp_path, tiny_cfg, tiny_state, monkeypatch):
    # A tokenization cache pickled by metaseq: only importable with metaseq, never executed.
    module = type(sys)("metaseq.data.fake")

    class TokenizationCache:
        def __reduce__(self):
            return (TokenizationCache, ())

    TokenizationCache.__module__, TokenizationCache.__qualname__ = module.__name__, "TokenizationCache"
    module.TokenizationCache = TokenizationCache
    with monkeypatch.context() as m:
        for name in ("metaseq", "metaseq.data"):
            m.setitem(sys.modules, name, type(sys)(name))
        m.setitem(sys.modules, module.__name__, module)
        ckpt = synthetic._checkpoint(tiny_cfg, dict(tiny_state), 1)
        ckpt["extra_state"]["train_iterator"] = {"epoch": 7, "cache": TokenizationCache()}
        torch.save(ckpt, tmp_path / "consolidated.pt")
    reshard([str(tmp_path / "consolidated.pt")], 2, tmp_path / "out", progress=False)
    assert load(part(tmp_path / "out", 0))["extra_state"]["train_iterator"] == {"epoch": 7}


# -- the command line -----------------------------------------------------------------------

def test_cli_as_documented_in_a_subprocess(tmp_path, src):
    # `reshard --mp 2 consolidated.pt`, relative path, no subcommand, default output folder.
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "reshard.cli", "--mp", "2", "consolidated.pt"],
                          cwd=src.parent, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = src.parent / "mp2"
    assert str(out) in proc.stdout and "resharded tiny-8h from mp1 to mp2" in proc.stdout
    assert "reshard -> mp2" in proc.stderr  # the progress bar
    assert part(out, 0).is_file() and part(out, 1).is_file()
    assert verify(out, progress=False) == []


def test_cli_help_reads_like_documentation(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    for words in ("K,V,Q", "mp{M}", "manifest.json", "reshard inspect", "reshard verify",
                  "--input-qkv", "reshard.pt"):
        assert words in text


def test_cli_inspect(capsys, tmp_path, tiny_cfg, tiny_state, src, monkeypatch):
    synthetic.write_fsdp_shards(tmp_path / "fsdp", tiny_cfg, tiny_state, mp=2, dp=3)
    # Only pickles are read: any attempt to read tensor bytes fails the test.
    from opt_serving.checkpoint.lazy_tensor import LazyTensor
    monkeypatch.setattr(LazyTensor, "read", lambda *a, **k: pytest.fail("read tensor bytes"))
    monkeypatch.setattr(LazyTensor, "mmap", lambda *a, **k: pytest.fail("mapped tensor bytes"))
    rc, out, _ = cli(capsys, "inspect", "--json", src, tmp_path / "fsdp")
    assert rc == 0
    cons, fsdp = json.loads(out)
    assert cons["kind"].startswith("consolidated") and "separate" in cons["kind"]
    assert (cons["model"], cons["exact_preset"], cons["dtype"]) == ("tiny-8h", True, "fp16")
    assert cons["parameters"] == tiny_cfg.param_count() and cons["mp"] == 1
    assert cons["valid_mp"] == [1, 2, 4, 8] and cons["bytes_on_disk"] == src.stat().st_size
    assert fsdp["kind"] == "flattened FSDP shards"
    assert (fsdp["mp"], fsdp["dp_shards_per_part"], fsdp["files"]) == (2, 3, 6)
    rc, out, _ = cli(capsys, "inspect", src)
    assert rc == 0 and "valid --mp" in out and "1, 2, 4, 8" in out and "tiny-8h" in out


def test_cli_verify_finds_problems(capsys, tmp_path, src):
    out = tmp_path / "mp2"
    reshard([str(src)], 2, out, progress=False)
    assert cli(capsys, "verify", out, "--no-progress")[0] == 0
    # Part 1 with a changed layer norm: a replicated-tensor mismatch and a checksum mismatch.
    ckpt = load(part(out, 1), mmap=False)
    ckpt["model"]["decoder.layer_norm.weight"] = ckpt["model"]["decoder.layer_norm.weight"] + 1
    torch.save(ckpt, part(out, 1))
    rc, text, _ = cli(capsys, "verify", out, "--json", "--no-progress")
    problems = json.loads(text)["problems"]
    assert rc == 1 and len(problems) == 2
    assert "replicated tensors differ" in problems[0] and "decoder.layer_norm.weight" in problems[0]
    assert str(part(out, 1)) in problems[1]


# -- bad input ------------------------------------------------------------------------------

def test_invalid_degree(capsys, src):
    refused(capsys, src.parent, "--mp", "3", src, names=src,
            says=["tiny-8h has 8 heads", "valid --mp values are 1, 2, 4, 8"])


def test_invalid_degree_message_for_bb3_30b():
    with pytest.raises(ValueError) as e:
        get_preset("bb3-30b").check_mp(16)
    assert "bb3-30b has 56 heads" in str(e.value)
    assert "valid --mp values are 1, 2, 4, 8" in str(e.value)
    assert get_preset("opt-175b").valid_mp_degrees() == [1, 2, 4, 8, 16, 32]


def test_truncated_file(capsys, src):
    data = src.read_bytes()
    src.write_bytes(data[:len(data) * 2 // 3])
    refused(capsys, src.parent, "--mp", "2", src, names=src, says=["truncated"])


def test_corrupt_file(capsys, src):
    with zipfile.ZipFile(src) as zf:
        info = next(i for i in zf.infolist() if i.filename.endswith("data.pkl"))
    with open(src, "r+b") as f:  # scramble bytes inside the stored pickle record
        f.seek(info.header_offset + 30 + len(info.filename) + 200)
        f.write(os.urandom(64))
    refused(capsys, src.parent, "--mp", "2", src, names=src, says=["corrupt"])


@pytest.mark.parametrize("kind", ["text", "zip", "tensor"])
def test_not_a_checkpoint(capsys, tmp_path, kind):
    path = tmp_path / "model.pt"
    if kind == "text":
        path.write_text("these are not the weights you are looking for\n")
    elif kind == "zip":
        with zipfile.ZipFile(path, "w") as zf:
            zf.writestr("readme.txt", "hello")
    else:
        torch.save(torch.zeros(3), path)
    refused(capsys, tmp_path, "--mp", "1", path, names=path, says=["not"])


@pytest.mark.parametrize("zip_format", [True, False])
def test_pickle_that_runs_code_is_refused(capsys, tmp_path, tiny_cfg, tiny_state, zip_format):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (exec, (f"open({str(marker)!r}, 'w').write('ran')",))

    ckpt = synthetic._checkpoint(tiny_cfg, dict(tiny_state), 1)
    ckpt["extra_state"]["payload"] = Payload()
    path = tmp_path / "consolidated.pt"
    torch.save(ckpt, path, _use_new_zipfile_serialization=zip_format)
    refused(capsys, tmp_path, "--mp", "2", path, names=path, says=["refused", "exec", "nothing was executed"])
    assert cli(capsys, "inspect", path)[0] == 2
    assert not marker.exists()
    torch.load(path, weights_only=False)  # the control: a plain unpickler does run it
    assert marker.read_text() == "ran"


def test_parts_disagree_on_replicated_tensors(capsys, tmp_path, tiny_cfg, tiny_state):
    paths = synthetic.write_mp_parts(tmp_path / "parts", tiny_cfg, tiny_state, 2)
    ckpt = load(paths[1], mmap=False)
    ckpt["model"]["decoder.layers.1.fc2.bias"] = ckpt["model"]["decoder.layers.1.fc2.bias"] * 2
    torch.save(ckpt, paths[1])
    refused(capsys, tmp_path, "--mp", "1", tmp_path / "parts", names=paths[1],
            says=["disagrees", "decoder.layers.1.fc2.bias"])


def test_missing_keys_and_missing_parts(capsys, tmp_path, tiny_cfg, tiny_state):
    paths = synthetic.write_mp_parts(tmp_path / "parts", tiny_cfg, tiny_state, 4)
    ckpt = load(paths[2], mmap=False)
    del ckpt["model"]["decoder.layers.0.fc1.bias"]
    torch.save(ckpt, paths[2])
    refused(capsys, tmp_path, "--mp", "2", tmp_path / "parts", names=paths[2],
            says=["lacks 1 expected tensors", "decoder.layers.0.fc1.bias"])
    paths[1].unlink()
    refused(capsys, tmp_path, "--mp", "2", tmp_path / "parts", names="reshard",
            says=["missing"])


def test_ambiguous_fused_qkv_needs_a_flag(capsys, tmp_path, tiny_cfg, tiny_state):
    # Eight MP parts naively concatenated along dim 0: [K_0; V_0; Q_0; K_1; ...], cfg mp 8.
    parts = [expected_part(tiny_state, r, 8) for r in range(8)]
    naive = {n: (torch.cat([p[n] for p in parts]) if "qkv_proj" in n else t)
             for n, t in tiny_state.items()}
    path = tmp_path / "consolidated.pt"
    synthetic.write_consolidated(path, tiny_cfg, naive, separate=False, trained_mp=8)
    refused(capsys, tmp_path, "--mp", "2", path, names=path,
            says=["--input-qkv global", "--input-qkv concat:N"])
    assert inspect_path(str(path))["qkv"].startswith("ambiguous")
    rc, _, err = cli(capsys, "--mp", "1", path, "--input-qkv", "concat:8",
                     "--output-dir", tmp_path / "out", "--no-progress")
    assert rc == 0, err
    assert_state_equal(load(part(tmp_path / "out", 0))["model"], tiny_state)


def test_disk_full(tmp_path, src):
    # A 1 MB file-size limit makes the first large write fail with EFBIG, as a full disk would.
    script = ("import resource, signal, sys\n"
              "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
              "resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))\n"
              "from reshard.cli import main\n"
              "sys.exit(main(sys.argv[1:]))\n")
    before = snapshot(tmp_path)
    proc = subprocess.run([sys.executable, "-c", script, "--mp", "2", str(src),
                           "--no-progress"], env={**os.environ, "PYTHONPATH": str(ROOT)},
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("reshard: error: ") and "Traceback" not in proc.stderr
    assert "disk is full" in proc.stderr
    assert str(src.parent / "mp2" / "reshard-model_part-0.pt") in proc.stderr
    assert snapshot(tmp_path) == before  # no mp2/, no staging folder, no .partial file


def test_non_empty_output_folder(capsys, tmp_path, src):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    refused(capsys, tmp_path, "--mp", "2", src, "--output-dir", out, names=out,
            says=["not empty", "--overwrite"])
    rc, stdout, err = cli(capsys, "--mp", "2", src, "--output-dir", out, "--overwrite",
                          "--no-progress")
    assert rc == 0, err and str(out) in stdout
    assert sorted(p.name for p in out.iterdir()) == [
        "manifest.json", "reshard-model_part-0.pt", "reshard-model_part-1.pt"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
