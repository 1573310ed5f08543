"""``opt-demo``: the whole toolkit on a tiny generated model, in about a minute on a CPU.

1. write a random BlenderBot-3-shaped checkpoint as BB3-30B ships (one ``consolidated.pt``,
   separate q/k/v projections, fp16);
2. ``reshard --mp 2`` it, then ``reshard inspect`` and ``reshard verify`` the result;
3. start ``opt-serve`` on the two parts (two tensor-parallel worker processes) and
   ``opt-search-server`` on a small indexed corpus, both on loopback;
4. hold a short chat through the BB3 agent, with search and long-term memory.

The weights are random, so the replies are gibberish; what the demo shows is the plumbing.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import requests

from assets import FILES as ASSET_FILES, asset_dir, has_assets
from reshard.core import reshard
from reshard.inspect import format_report, inspect_path
from reshard.verify import verify

from opt_serving.testing import synthetic
from opt_serving.config import get_preset
from opt_serving.distributed import free_port

CORPUS = {
    "opt.txt": "OPT (Open Pre-trained Transformers) is a suite of decoder-only language models "
               "released by Meta AI in 2022, from 125 million to 175 billion parameters.",
    "blenderbot.txt": "BlenderBot 3 is a chatbot from Meta AI built on OPT. It decides when "
                      "to search the internet and keeps a long-term memory of its partner.",
    "hiking.txt": "People who love hiking in the mountains should carry water, a map and warm "
                  "clothes: the weather changes fast above the tree line.",
    "paris.md": "# Paris\nParis is the capital of France, known for the Eiffel Tower and the "
                "Louvre museum.",
}
CHAT = ["Hi! I love hiking in the mountains.", "What do you know about BlenderBot 3?",
        "Do you remember what I like to do?"]


def _speaking_weights(state: dict, assets: Path | None) -> dict:
    """Random weights nudged to answer in the demo's own words.

    Pure std-0.02 weights give near-uniform next-token distributions over 50k ids, i.e. an
    unreadable stream of rare tokens. Scaling the final layer norm makes the distributions
    peaked, and enlarging the (tied) embedding rows of the words in the demo corpus makes those
    the likely outputs. Still gibberish, but legible gibberish.
    """
    if assets is not None:
        from opt_serving.tokenizer import Tokenizer

        tok = Tokenizer.from_folder(assets_dir=assets)
    else:
        from opt_serving.demo_tokenizer import ByteTokenizer

        tok = ByteTokenizer()
    ids = sorted({i for text in [*CORPUS.values(), *CHAT] for i in tok.encode(" " + text)})
    state["decoder.layer_norm.weight"] *= 8.0
    state["decoder.embed_tokens.weight"][ids] *= 2.5
    return state


def _say(step: str) -> None:
    print(f"\n== {step}", flush=True)


@contextlib.contextmanager
def _process(cmd: list[str], ready_url: str, log: Path, timeout: float = 180.0):
    """Run a server until the block ends; wait until ``ready_url`` answers 200."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{cmd[0]} exited with {proc.returncode}; see {log}")
            try:
                if requests.get(ready_url, timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{cmd[0]} did not become ready in {timeout:.0f} s; see {log}")
            time.sleep(0.5)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


def _tool(module: str) -> list[str]:
    """A console script's module run by this interpreter (works without the venv on PATH)."""
    return [sys.executable, "-m", module]


def run_demo(out: Path, *, preset: str = "tiny-8h", mp: int = 2, assets: Path | None = None,
             chat: bool = True) -> int:
    out = out.resolve()
    source = out / "bb3-tiny"
    if out.exists():
        shutil.rmtree(out)
    source.mkdir(parents=True)
    cfg = get_preset(preset)

    _say(f"1. a random {preset} checkpoint in BB3-30B's layout")
    assets = assets or (asset_dir() if has_assets(asset_dir()) else None)
    if assets is not None and not has_assets(assets):
        raise SystemExit(f"opt-demo: {assets} lacks gpt2-vocab.json / gpt2-merges.txt")
    state = _speaking_weights(synthetic.random_state(cfg, seed=0), assets)
    ckpt = synthetic.write_consolidated(source / "consolidated.pt", cfg,
                                        {k: v.half() for k, v in state.items()}, separate=True)
    if assets is not None:
        for name in ASSET_FILES:
            shutil.copyfile(Path(assets) / name, source / name)
        print(f"tokenizer: metaseq's gpt2 BPE from {assets} (copied next to the checkpoint)")
    else:
        print("tokenizer: gpt2-vocab.json / gpt2-merges.txt not found (run `opt-assets fetch`"
              " or pass --assets DIR): the server uses its byte-level demo tokenizer, which "
              "suits random demo models only")
    print(f"wrote {ckpt} ({ckpt.stat().st_size / 1e6:.1f} MB)")

    _say(f"2. reshard --mp {mp} {ckpt.name}")
    result = reshard([str(ckpt)], mp, progress=True)
    print(result.summary())
    _say(f"   reshard inspect {result.output_dir.name}")
    print(format_report(inspect_path(str(result.output_dir))))
    _say(f"   reshard verify {result.output_dir.name}")
    problems = verify(result.output_dir, progress=False)
    print("verify: OK" if not problems else "\n".join(problems))
    if problems:
        return 1
    if not chat:
        return 0
    return _serve_and_chat(out, result.output_dir, assets if assets and has_assets(assets)
                           else None)


def _serve_and_chat(out: Path, folder: Path, assets: Path | None) -> int:
    from agents.bb3 import Agent, AgentConfig, AgentError

    _say("3. opt-search-server index + serve, opt-serve on the two parts")
    corpus = out / "corpus"
    corpus.mkdir()
    for name, text in CORPUS.items():
        (corpus / name).write_text(text + "\n")
    index = out / "kb.sqlite"
    subprocess.run([*_tool("agents.search.cli"), "index", "--index", str(index), str(corpus)],
                   check=True)
    search_port, opt_port = free_port(), free_port()
    search_cmd = [*_tool("agents.search.cli"), "--index", str(index), "--port", str(search_port)]
    serve_cmd = [*_tool("opt_serving.server.cli"), "--checkpoint-folder", str(folder), "--port", str(opt_port),
                 "--max-seq-len", "512", "--kv-tokens", "8192"]
    serve_cmd += ["--assets", str(assets)] if assets else ["--demo-tokenizer"]
    search_url, opt_url = f"http://127.0.0.1:{search_port}", f"http://127.0.0.1:{opt_port}"
    with _process(search_cmd, search_url + "/healthz", out / "search-server.log"), \
            _process(serve_cmd, opt_url + "/readyz", out / "opt-serve.log"):
        print(f"opt-serve ready at {opt_url} (log: {out / 'opt-serve.log'})")
        print(f"opt-search-server ready at {search_url} (log: {out / 'search-server.log'})")
        r = requests.post(opt_url + "/completions", timeout=60, json={
            "prompt": "Hello, my name is", "max_tokens": 8, "temperature": 0})
        print(f"POST /completions -> {r.status_code}: {r.json()['choices'][0]['text']!r}")

        _say("4. a short chat through the BlenderBot-3 agent (search and memory always on)")
        cfg = AgentConfig(opt_server=opt_url, raw_search_server=search_url,
                          search_decision="always", memory_decision="always",
                          memory_db=str(out / "memory.sqlite"), user="demo",
                          persona=("I like reading about language models.",), safety="all",
                          tokenizer_dir=str(assets) if assets else None,
                          server_timeout_s=60, max_retry_api=1)
        with Agent(cfg) as agent:
            for text in CHAT:
                started = time.perf_counter()
                try:
                    reply = agent.respond(text)
                except AgentError as e:  # a random model may answer with an empty line
                    print(f"you: {text}\nbot: (no reply: {e})")
                    continue
                took = time.perf_counter() - started
                docs = len(reply.search.documents) if reply.search else 0
                shown = reply.text if len(reply.text) < 100 else reply.text[:97] + "..."
                print(f"you: {text}\nbot: {shown!r}\n     [{took:.2f} s, {len(reply.modules)} "
                      f"module calls, search query {reply.search.query if reply.search else None!r}"
                      f" -> {docs} documents]")
            print(f"long-term memories for 'demo': {agent.memory.texts()}")
    print(f"\nDone. Everything is in {out}.")
    return 0


DESCRIPTION = """\
The whole toolkit on a tiny generated model, in about a minute on a CPU:

  1. write a random BlenderBot-3-shaped checkpoint as BB3-30B ships (one consolidated.pt,
     separate q/k/v projections, fp16);
  2. reshard --mp 2 it, then reshard inspect and reshard verify the result;
  3. start opt-serve on the two parts (two tensor-parallel worker processes) and
     opt-search-server on a small indexed corpus, both on loopback;
  4. hold a short chat through the BB3 agent, with search and long-term memory.

The weights are random, so the replies are gibberish; what the demo shows is the plumbing."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="opt-demo", description=DESCRIPTION,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("demo-out"),
                   help="work folder, replaced on each run (default %(default)s)")
    p.add_argument("--preset", default="tiny-8h", help="model shape (default %(default)s)")
    p.add_argument("--mp", type=int, default=2,
                   help="model-parallel degree to reshard to (default %(default)s)")
    p.add_argument("--assets", type=Path, default=None,
                   help="folder with gpt2-vocab.json and gpt2-merges.txt (default: the "
                        "toolkit's assets folder, filled by `opt-assets fetch`)")
    p.add_argument("--no-chat", action="store_true", help="stop after resharding")
    return p


def main(argv=None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    return run_demo(args.out, preset=args.preset, mp=args.mp, assets=args.assets,
                    chat=not args.no_chat)


if __name__ == "__main__":
    sys.exit(main())
