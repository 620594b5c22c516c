"""Tensor-parallel generation over ``mx.distributed`` (MLX's ring backend over loopback,
several processes on this machine, started by ``mlx.launch``): the same greedy tokens as
one process, caches split by kv head within the group's budget, rank 0 alone talking, and
clear errors for a group that cannot work."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

import mlxkv
import mlxkv.cli
from helpers import write_tiny_llama_folder
from mlxkv.chat import ChatSession, kv_path
from mlxkv.distributed import Group
from mlxkv.errors import CacheFileError
from mlxkv.persist import load_cache

LAUNCH = Path(sys.executable).with_name("mlx.launch")
SCRIPT = Path(__file__).parent / "scripts" / "tensor_parallel.py"
# one BLAS thread per rank: several ranks share this machine's two cores
ENV = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def free_ports(n: int) -> int:
    """The first of ``n`` consecutive free loopback ports."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + n > 65535:
            continue
        try:
            socks = []
            for p in range(base, base + n):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", p))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free ports")


def launch_cmd(n: int, *command, env: tuple[str, ...] = ()) -> list[str]:
    """mlx.launch running ``python command`` as ``n`` ranks (ring backend, loopback), with
    one BLAS thread each and ``env`` ("NAME=value") set on every rank."""
    cmd = [str(LAUNCH), "-n", str(n), "--backend", "ring", "-p", str(free_ports(n))]
    for e in ("OPENBLAS_NUM_THREADS=1", *env):
        cmd += ["--env", e]
    return cmd + ["--", sys.executable, *command]


def launch(n: int, *command, timeout: float = 300, stdin: str | None = None):
    """Run ``command`` as ``n`` ranks with mlx.launch."""
    return subprocess.run(launch_cmd(n, *command), capture_output=True, text=True,
                          timeout=timeout, input=stdin, env=ENV)


def script(model: str, mode: str, budget: int, *extra, ranks: int = 1, tokens: int = 16) -> dict:
    args = [str(SCRIPT), model, mode, str(budget), *extra]
    env = {**ENV, "TP_TOKENS": str(tokens)}
    cmd = ([sys.executable, *args] if ranks == 1
           else launch_cmd(ranks, *args, env=(f"TP_TOKENS={tokens}",)))
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def tiny_tp(tmp_path_factory):
    """A random llama with 8 query and 4 kv heads (head dim 32), as a folder."""
    return str(write_tiny_llama_folder(tmp_path_factory.mktemp("tp") / "tiny-llama"))


def check_same(one: dict, group: dict, ranks: int, budget: int) -> None:
    assert group["size"] == ranks and one["size"] == 1
    for name in ("full", "4-bit", "snapkv"):
        a, b = one[name], group[name]
        assert b["tokens"] == a["tokens"], name
        assert len(b["ranks"]) == ranks and sum(r[0] for r in b["ranks"]) == b["nbytes"] == a["nbytes"]
        assert len({r[0] for r in b["ranks"]}) == 1  # the heads split evenly
    snap = group["snapkv"]
    assert snap["kept"] < snap["seen"]  # the budget evicted
    assert snap["nbytes"] <= snap["budget"] == budget
    assert all(r[0] <= r[1] == budget // ranks for r in snap["ranks"])


def test_two_ranks_give_the_tokens_of_one_process(tiny_tp):
    one = script(tiny_tp, "greedy", 200_000)
    two = script(tiny_tp, "greedy", 200_000, ranks=2)
    check_same(one, two, 2, 200_000)


def test_generate_and_chat_commands_on_two_ranks(tiny_tp, capsys):
    """The CLI under mlx.launch: rank 0 alone prints, -v shows the whole cache and each
    rank's part; in the line chat rank 0 reads the input for both."""
    flags = ["--model", tiny_tp, "--max-tokens", "12", "--kv-bits", "4", "--kv-budget", "120KB"]
    prompt = "the cat sat on the mat " * 8
    r = launch(2, "-m", "mlxkv.cli", "generate", *flags, "-v", "--prompt", prompt)
    assert r.returncode == 0, r.stderr[-2000:]
    assert mlxkv.cli.main(["generate", *flags, "-v", "--prompt", prompt]) == 0
    alone = capsys.readouterr()
    assert r.stdout == alone.out  # the same reply, printed once
    kv_line = [line for line in r.stderr.splitlines() if line.startswith("KV cache:")]
    assert kv_line == [line for line in alone.err.splitlines() if line.startswith("KV cache:")]
    assert "over 2 processes: rank 0" in r.stderr and "rank 1" in r.stderr
    assert r.stderr.count("KV cache:") == 1
    chat = launch(2, "-m", "mlxkv.cli", "chat", "--plain", *flags, stdin="hello\nagain\n/exit\n")
    assert chat.returncode == 0, chat.stderr[-2000:]
    assert chat.stdout.count("over 2 processes") == 2  # two replies, each shown once
    piped = launch(2, "-m", "mlxkv.cli", "generate", *flags, stdin="hi", timeout=120)
    # (mlx.launch exits 0 whatever its ranks do: what it forwards from rank 0 tells)
    assert piped.stderr.count("mlxkv: error: in a group (mlx.launch) give the prompt as an argument") == 1


def test_heads_that_do_not_divide_are_a_clear_error_on_rank_0(tiny_tp):
    start = time.monotonic()
    r = launch(3, "-m", "mlxkv.cli", "generate", "--model", tiny_tp, "hi", timeout=120)
    assert time.monotonic() - start < 120
    assert "4 kv heads and an MLP width of 256 do not divide over 3 processes: launch 2 or 4 " \
        "processes" in r.stderr
    assert r.stderr.count("mlxkv: error:") == 1 and "Traceback" not in r.stderr


def test_a_killed_rank_ends_the_others_with_an_error(tiny_tp, tmp_path):
    """Two ranks started by hand (no launcher to clean up): rank 1 is killed mid-reply;
    rank 0 says the group failed and exits, within a bounded time."""
    base = free_ports(2)
    hosts = tmp_path / "hosts.json"
    hosts.write_text(json.dumps([[f"127.0.0.1:{base}"], [f"127.0.0.1:{base + 1}"]]))
    cmd = [sys.executable, "-m", "mlxkv.cli", "generate", "--model", tiny_tp, "--max-tokens",
           "1000000", "--kv-window", "64", "the cat"]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**ENV, "MLX_RANK": str(r), "MLX_HOSTFILE": str(hosts)})
             for r in range(2)]
    try:
        assert procs[0].stdout.read(20)  # rank 0 is replying
        procs[1].send_signal(signal.SIGKILL)
        assert procs[0].wait(timeout=60) == 1
        err = procs[0].stderr.read()
        assert "rank 0 of 2: the group failed" in err and "Traceback" not in err
    finally:
        for p in procs:
            p.kill()
            p.wait()


def test_a_groups_saved_chat_resumes_in_the_group_and_only_there(tiny_tp, tmp_path):
    path = tmp_path / "chat.json"
    out = script(tiny_tp, "resume", 200_000, str(path), ranks=2, tokens=8)
    assert out["note"] is None and out["again"] == out["first"]  # resumed from its cache
    assert kv_path(path, Group()) != kv_path(path, FakeGroup(0, 2))
    assert kv_path(path, FakeGroup(0, 2)).exists() and kv_path(path, FakeGroup(1, 2)).exists()
    model, tok = mlxkv.load(tiny_tp)
    with pytest.raises(CacheFileError, match="rank 1 of a group of 2 processes, and this is one process"):
        load_cache(kv_path(path, FakeGroup(1, 2)), model)
    alone = ChatSession.resume(path, model, tok, max_tokens=8)  # rebuilt from the messages
    assert "saved by a group of 2 processes, and this is one process" in alone.resume_note
    assert len(alone.messages) == 2


def FakeGroup(rank: int, size: int) -> Group:
    """A rank and size without a transport (for file names only)."""
    return Group(SimpleNamespace(rank=lambda: rank, size=lambda: size))


def test_default_model_over_three_ranks(smollm):
    """SmolLM2-135M has 3 kv heads: one per rank. Full, 4-bit and snapkv in a budget."""
    sys.path.insert(0, str(SCRIPT.parent))
    from tensor_parallel import greedy

    budget = 1_080_000  # the same window per kv head split or not (90 per layer and rank)
    one = {"size": 1, **greedy(*smollm, budget, 8)}
    three = script("smollm2-135m", "greedy", budget, ranks=3, tokens=8)
    check_same(one, three, 3, budget)


def test_a_process_started_as_a_rank_without_its_group_says_so(tiny_tp):
    env = {k: v for k, v in ENV.items() if not k.startswith("MLX_")}
    r = subprocess.run([sys.executable, "-m", "mlxkv.cli", "generate", "--model", tiny_tp, "hi"],
                       capture_output=True, text=True, timeout=60, env={**env, "MLX_RANK": "0"})
    assert r.returncode == 2 and "started as rank 0 of a group" in r.stderr
    assert "could not be formed" in r.stderr and "Traceback" not in r.stderr


def test_serve_on_two_ranks(tiny_tp, tmp_path):
    """Rank 0 serves HTTP, rank 1 follows each request; /v1/kv shows each rank's part."""
    import urllib.request

    port = free_ports(1)
    cmd = launch_cmd(2, "-m", "mlxkv.cli", "serve", "--model", tiny_tp, "--port", str(port),
                     "--kv-bits", "4", "--kv-budget", "200KB")
    # its own session: the launcher and its ranks stop together, as Ctrl-C stops them
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**ENV, "TMPDIR": str(tmp_path)}, start_new_session=True)
    try:
        line = proc.stdout.readline()
        assert f"127.0.0.1:{port}" in line, line
        url = f"http://127.0.0.1:{port}/v1"
        replies = []
        for stream in (False, True, False):
            body = json.dumps({"messages": [{"role": "user", "content": "the cat sat"}],
                               "max_tokens": 6, "temperature": 0, "stream": stream}).encode()
            req = urllib.request.Request(url + "/chat/completions", body,
                                         {"Content-Type": "application/json"})
            replies.append(urllib.request.urlopen(req, timeout=120).read().decode())
        first, last = json.loads(replies[0]), json.loads(replies[2])
        assert first["choices"][0]["message"]["content"] == last["choices"][0]["message"]["content"]
        assert "[DONE]" in replies[1]
        view = json.loads(urllib.request.urlopen(url + "/kv", timeout=30).read())
        assert view["group_size"] == 2 and len(view["rank_bytes"]) == 2
        assert view["rank_bytes"][0] == view["rank_bytes"][1] > 0
        assert sum(view["rank_bytes"]) == view["total_bytes"]
        assert all(len(row["ranks"]) == 2 for row in view["sessions"])
    finally:
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C: every rank stops and cleans up
        proc.wait(timeout=60)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and subprocess.run(
                ["pgrep", "-g", str(proc.pid)], capture_output=True).returncode == 0:
            time.sleep(0.2)
        subprocess.run(["pkill", "-KILL", "-g", str(proc.pid)], capture_output=True)
    assert not [p for p in os.listdir(tmp_path) if p.startswith("mlxkv-serve-")]
