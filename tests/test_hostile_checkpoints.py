"""Hostile checkpoints (issue 8, classes 1-7): each crafted file ends in a CheckpointError that
names it, nothing from it runs or patches anything, and memory and time stay bounded."""

from __future__ import annotations

import argparse
import json
import os
import struct
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch

from opt_serving.checkpoint import torch_file
from opt_serving.testing import synthetic
from opt_serving.checkpoint.errors import CheckpointError
from opt_serving.checkpoint.formats import model_config, open_parts
from opt_serving.testing.crafted import Ops, write_zip
from reshard.cli import main as reshard_main

FLOATS = struct.pack("<8f", *range(8))  # one 8-element float32 storage


def refused(path, *words):
    with pytest.raises(CheckpointError) as e:
        torch_file.load(path)
    assert str(path) in str(e.value)
    for w in words:
        assert w in str(e.value)
    return e.value


# -- 1. BUILD / SETSTATE ----------------------------------------------------------------------

def test_build_cannot_repoint_a_tensor_at_another_file(tmp_path):
    ops = Ops().tensor("0", 8, 0, (8,), (1,)).dict(path="/etc/passwd", file_offset=0)
    refused(write_zip(tmp_path / "x.pt", ops.raw(b"b").done(), {"0": FLOATS}),
            "set the state of a LazyTensor")


def test_build_cannot_patch_an_allowed_class(tmp_path):
    ops = Ops().glob("argparse", "Namespace").dict(__init__=None, patched=1).raw(b"b")
    refused(write_zip(tmp_path / "x.pt", ops.done()), "argparse.Namespace")
    assert not hasattr(argparse.Namespace, "patched")
    # ... nor a placeholder class, nor one of our constructors.
    ops = Ops().glob("metaseq.foo", "Bar").dict(x=1).raw(b"b")
    refused(write_zip(tmp_path / "y.pt", ops.done()), "the class")


def test_build_on_a_namespace_instance_still_works(tmp_path):
    ops = Ops().glob("argparse", "Namespace").raw(b")\x81")  # NEWOBJ with no args
    ops.dict(decoder_layers=2).raw(b"b")
    ns = torch_file.load(write_zip(tmp_path / "x.pt", ops.done()))
    assert isinstance(ns, argparse.Namespace) and ns.decoder_layers == 2
    ops = Ops().glob("argparse", "Namespace").raw(b")\x81").dict(__class__=1).raw(b"b")
    refused(write_zip(tmp_path / "y.pt", ops.done()), "plain attribute names")


# -- 2. memory bombs and nesting (one process, peak RSS measured) -----------------------------

BOMBS = {
    "bytearray": Ops().call("builtins", "bytearray", 10**10).done(),
    "set-range": Ops().glob("builtins", "set").raw(b"(").call("builtins", "range", 10**9)
                      .raw(b"tR").done(),
    "torch-size": Ops().glob("torch", "Size").raw(b"(").call("builtins", "range", 10**8)
                       .raw(b"tR").done(),
    "memo": Ops().raw(b"N" + b"r" + struct.pack("<I", 0x7FFFFFFF)).done(),
    "self-list": Ops().raw(b"]q\x00h\x00a").done(),  # l = []; l.append(l)
    "deep-list": Ops().raw(b"]" * 100_000 + b"a" * 99_999).done(),
    "many-ops": Ops().raw(b"]" + b"]a" * 5_000_000).done(),
}
BOMB_SCRIPT = r"""
import resource, sys
from opt_serving.checkpoint import torch_file
from opt_serving.checkpoint.errors import CheckpointError
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
for path in sys.argv[1:]:
    try:
        torch_file.load(path)
        print("LOADED", path)
    except CheckpointError as e:
        print("REFUSED", path, "|", e)
print("PEAK_MB", (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024)
"""


def test_memory_bombs_are_refused_within_bounded_memory(tmp_path):
    paths = [str(write_zip(tmp_path / f"{name}.pt", data)) for name, data in BOMBS.items()]
    # A 4 MiB zip whose data.pkl inflates to 256 MiB of opcodes.
    inflating = tmp_path / "inflate.pt"
    with zipfile.ZipFile(inflating, "w", zipfile.ZIP_DEFLATED) as zf:
        with zf.open("archive/data.pkl", "w") as f:
            f.write(b"\x80\x02]")
            for _ in range(256):
                f.write(b"N" * (1 << 20))
    paths.append(str(inflating))
    out = subprocess.run([sys.executable, "-c", BOMB_SCRIPT, *paths], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.splitlines()
    assert [ln.split()[1] for ln in lines if ln.startswith("REFUSED")] == paths, out.stdout
    assert float(lines[-1].split()[1]) < 512, lines[-1]


def test_bomb_messages_say_what_is_wrong(tmp_path):
    refused(write_zip(tmp_path / "a.pt", BOMBS["bytearray"]), "bytearray of 10000000000")
    refused(write_zip(tmp_path / "b.pt", BOMBS["self-list"]), "contains itself")
    refused(write_zip(tmp_path / "c.pt", BOMBS["deep-list"]), "deep")


def test_a_huge_cfg_is_refused_before_anything_is_sized(tmp_path, tiny_cfg, tiny_state):
    path = tmp_path / "consolidated.pt"
    synthetic.write_consolidated(path, tiny_cfg, tiny_state)
    ckpt = torch.load(path, weights_only=False)
    for field, value in (("decoder_layers", 10**7), ("decoder_attention_heads", 0),
                         ("decoder_embed_dim", -64), ("decoder_ffn_embed_dim", 256.5),
                         ("decoder_layers", "2")):
        bad = dict(ckpt, cfg={**ckpt["cfg"], "model": argparse.Namespace(
            **{**vars(ckpt["cfg"]["model"]), field: value})})
        torch.save(bad, tmp_path / "bad.pt")
        with pytest.raises(CheckpointError, match="unusable model configuration") as e:
            model_config(open_parts([str(tmp_path / "bad.pt")])[0])
        assert f"{field} must be an integer" in str(e.value)
        assert reshard_main(["inspect", str(tmp_path / "bad.pt")]) == 2


# -- 3. tensor extents ------------------------------------------------------------------------

@pytest.mark.parametrize("numel,offset,size,stride,words", [
    (16, 0, (8,), (1,), "record has 32 bytes"),        # storage claims more than its record
    (8, -2, (8,), (1,), "negative"),                    # before the storage
    (8, 4, (8,), (1,), "ends past its storage"),        # runs into the next record
    (8, 0, (4, 4), (0, 1), "stride of 0"),              # aliasing rows
    (8, 7, (8,), (-1,), "stride of -1"),                # walking backwards
])
def test_tensor_records_stay_inside_their_storage(tmp_path, numel, offset, size, stride, words):
    ops = Ops().raw(b"}(").str("a").tensor("0", numel, offset, size, stride)
    ops.str("b").tensor("1", 8, 0, (8,), (1,)).raw(b"u")
    refused(write_zip(tmp_path / "x.pt", ops.done(), {"0": FLOATS, "1": FLOATS}), words)


def test_views_inside_a_storage_still_load(tmp_path):
    ops = Ops().raw(b"}(").str("a").tensor("0", 8, 2, (2, 3), (3, 1)).raw(b"u")
    t = torch_file.load(write_zip(tmp_path / "x.pt", ops.done(), {"0": FLOATS}))["a"]
    assert t.read().tolist() == [[2, 3, 4], [5, 6, 7]]


# -- 4. placeholders in odd places ------------------------------------------------------------

@pytest.mark.parametrize("ops,words", [
    (Ops().glob("builtins", "set").raw(b"((").glob("metaseq.x", "Y").raw(b")RltR"),
     "into a set"),
    (Ops().raw(b"}").glob("metaseq.x", "Y").raw(b")R").int(1).raw(b"s"), "dict key"),
    (Ops().dict(cfg=Ops().glob("metaseq.x", "Y")), "class metaseq.x.Y"),
    (Ops().glob("torch._utils", "_rebuild_parameter"), "itself where data belongs"),
])
def test_placeholders_in_odd_places_are_refused(tmp_path, ops, words):
    refused(write_zip(tmp_path / "x.pt", ops.done()), words)


# -- 5. refused names import nothing ----------------------------------------------------------

def test_a_refused_reference_imports_nothing(tmp_path):
    path = write_zip(tmp_path / "x.pt", Ops().glob("torch", "_inductor").done())
    plain = write_zip(tmp_path / "plain.pt", Ops().dict(a=1).done())
    script = ("import sys; from opt_serving.checkpoint import torch_file\n"
              f"torch_file.load({str(plain)!r})\n"  # what reading any file imports
              "before = set(sys.modules)\n"
              "try: torch_file.load(sys.argv[1])\n"
              "except Exception as e: print(type(e).__name__)\n"
              "print(sorted(set(sys.modules) - before))")
    out = subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True,
                         text=True, timeout=60)
    assert out.stdout.splitlines() == ["CheckpointError", "[]"], out.stdout + out.stderr


# -- 6. legacy format and FSDP metadata --------------------------------------------------------

def test_legacy_file_with_a_bad_storage_size(tmp_path):
    path = tmp_path / "old.pt"
    torch.save({"model": {"w": torch.arange(4.0)}}, path, _use_new_zipfile_serialization=False)
    assert torch_file.load(path)["model"]["w"].read().tolist() == [0, 1, 2, 3]
    data = bytearray(path.read_bytes())
    data[-16 - 8:-16] = struct.pack("<q", -5)  # the storage's element count
    path.write_bytes(bytes(data))
    refused(path, "legacy format", "-5")


@pytest.mark.parametrize("mutate,words", [
    (lambda m: m.update(param_metadata={"a": 1}), "param_metadata list"),
    (lambda m: m["param_metadata"][0].pop("params"), "no 'params'"),
    (lambda m: m["param_metadata"][0]["params"]["flat_param_0"]["numels"].pop(), "one length"),
    (lambda m: m["param_metadata"][0]["params"]["flat_param_0"].update(padding=-3), "padding"),
    (lambda m: m["param_metadata"][0]["params"]["flat_param_0"]["shapes"][0].__setitem__(0, -1),
     "shape"),
    (lambda m: m["param_metadata"].pop(), "does not match shard 0"),
])
def test_corrupt_fsdp_metadata_names_the_file(tmp_path, tiny_cfg, tiny_state, mutate, words):
    paths = synthetic.write_fsdp_shards(tmp_path, tiny_cfg, tiny_state, mp=1, dp=2)
    target = paths[1] if "shard 0" in words else paths[0]
    ckpt = torch.load(target, weights_only=False)
    mutate(ckpt["shard_metadata"])
    torch.save(ckpt, target)
    with pytest.raises(CheckpointError) as e:
        open_parts([str(tmp_path)])
    assert str(target) in str(e.value) and words in str(e.value)


# -- 7. tampered manifest ---------------------------------------------------------------------

@pytest.mark.parametrize("manifest", [
    {"format": 1, "mp": 1, "parts": "all of them"},
    {"format": 1, "mp": "1", "parts": [{"file": 3, "bytes": "x"}]},
    {"format": 1, "mp": 1, "parts": [{"file": "../../etc/passwd", "bytes": 1, "sha256": "0"}]},
    {"format": 1, "mp": 1, "parts": [], "assets": [{"a": 1}], "source": []},
    "[" * 100_000 + "]" * 100_000,
])
def test_tampered_manifest_is_a_verify_failure(tmp_path, tiny_cfg, tiny_state, capsys,
                                               manifest):
    from reshard.core import reshard

    synthetic.write_consolidated(tmp_path / "c.pt", tiny_cfg, tiny_state)
    out = reshard([str(tmp_path / "c.pt")], 1, tmp_path / "mp1", progress=False).output_dir
    text = manifest if isinstance(manifest, str) else json.dumps(manifest)
    (out / "manifest.json").write_text(text)
    assert reshard_main(["verify", str(out), "--no-progress"]) == 1
    assert reshard_main(["inspect", str(out)]) == 0
    err = capsys.readouterr()
    assert "manifest.json" in err.out and "Traceback" not in err.out + err.err


# -- 8-10. resharding output ------------------------------------------------------------------

def test_overwrite_never_deletes_an_input_below_the_output(tmp_path, tiny_cfg, tiny_state):
    out = tmp_path / "out"
    nested = out / "deep" / "er"
    nested.mkdir(parents=True)
    src = nested / "consolidated.pt"
    synthetic.write_consolidated(src, tiny_cfg, tiny_state)
    before = src.read_bytes()
    for args in (["--mp", "2", str(src), "--output-dir", str(out), "--overwrite"],
                 ["--mp", "2", str(nested), "--output-dir", str(nested), "--overwrite"],
                 ["--mp", "2", str(src), "--output-dir", str(tmp_path), "--overwrite"]):
        assert reshard_main(["--no-progress", *args]) == 2
        assert src.read_bytes() == before
    # Through a symlink too.
    (tmp_path / "link").symlink_to(out)
    assert reshard_main(["--no-progress", "--mp", "2", str(src), "--output-dir",
                         str(tmp_path / "link"), "--overwrite"]) == 2
    assert src.read_bytes() == before


def _big_checkpoint(path: Path) -> None:
    """~300 MB of zeros: long enough to write that a signal lands mid-way."""
    from opt_serving.config import OPTConfig

    cfg = OPTConfig(name="t", num_layers=2, embed_dim=1024, num_heads=8, ffn_dim=4096)
    state = {n: torch.zeros(s) for n, s in cfg.param_shapes().items()}
    synthetic.write_consolidated(path, cfg, state)


@pytest.mark.parametrize("signum", ["SIGTERM", "SIGHUP"])
def test_a_signal_mid_write_leaves_nothing_behind(tmp_path, signum):
    import signal as sig

    src = tmp_path / "consolidated.pt"
    _big_checkpoint(src)
    parent = tmp_path / "new" / "deeper"
    proc = subprocess.Popen([sys.executable, "-m", "reshard.cli", "--mp", "2", str(src),
                             "--no-progress", "--output-dir", str(parent / "mp2")],
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not list(parent.glob(".mp2.partial-*")):
        assert proc.poll() is None and time.monotonic() < deadline, "never started writing"
        time.sleep(0.001)
    os.kill(proc.pid, sig.SIGSTOP)  # hold it mid-write, then ask it to stop
    os.kill(proc.pid, getattr(sig, signum))
    os.kill(proc.pid, sig.SIGCONT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + getattr(sig, signum), err
    assert f"stopped by {signum}" in err and "Traceback" not in err
    assert not (tmp_path / "new").exists()  # the folders this run created are gone too


# An error while writing: the file-size limit (disk full, as the writer reports it) and the
# open-file limit (an OSError naming the file the writer was opening).
LIMITS = {
    "fsize": "resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, resource.RLIM_INFINITY))",
    "nofile": "import os; n = len(os.listdir('/proc/self/fd')) + 3\n"
              "resource.setrlimit(resource.RLIMIT_NOFILE, (n, resource.getrlimit("
              "resource.RLIMIT_NOFILE)[1]))",
}


@pytest.mark.parametrize("limit", LIMITS)
def test_write_errors_name_the_output_not_the_staging_file(tmp_path, tiny_cfg, tiny_state,
                                                           limit):
    src = tmp_path / "consolidated.pt"
    synthetic.write_consolidated(src, tiny_cfg, tiny_state)
    script = ("import resource, signal, sys\n"
              "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
              "from reshard.cli import main\n"
              f"{LIMITS[limit]}\n"
              "sys.exit(main(sys.argv[1:]))")
    out = subprocess.run([sys.executable, "-c", script, "--mp", "8", str(src), "--no-progress",
                          "--output-dir", str(tmp_path / "mp8")], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 2, out.stderr
    assert str(tmp_path / "mp8" / "reshard-model_part-") in out.stderr
    assert ".partial" not in out.stderr and "Traceback" not in out.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["consolidated.pt"]
