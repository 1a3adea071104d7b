"""Every code block of README.md runs as written (issue #15, item 8).

Each ```python block runs on its own in a fresh interpreter whose working folder is an empty
temporary one, with this test's interpreter and ``PYTHONPATH``: nothing from another block, from
the test or from the network (the Hugging Face hub is switched off). A block whose first line is
``# run with: torchrun ...`` is saved under the file name that line gives and run with that
command; a block that writes to ``s3://`` runs against moto's S3 server on 127.0.0.1 (as in
``tests/test_s3.py``), its credentials and endpoint in the environment variables the block reads.
A block preceded by ``<!-- not run: REASON -->`` is skipped, and the skipped ones must be exactly
``NOT_RUN``.

The ``$ trajstore ...`` commands shown in ```text blocks run too, each on a store made for it:
``plan`` must print the table the README shows (host memory within 0.05 GiB, which varies with
the interpreter's own footprint), ``info`` the README's lines with every number masked, and
``verify`` must find nothing wrong with the store the S3 block writes.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import subprocess
import sys
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
# Blocks allowed to stay unrun, by first line; each is preceded by <!-- not run: REASON -->.
NOT_RUN: list[str] = []
# A basis name as dldr makes it, "{trajectory}-{start}-{stop}-d{d}": valid only for that window,
# so a block must use the name its own dldr call returns (basis.name).
BASIS_NAME = re.compile(r"[\w.]+-\d+-\d+-d\d+")
TIMEOUT = 600  # seconds per block: a few seconds each on an idle 2-core machine, much more when loaded
EXTRAS = {"lightning": ("lightning",), "transformers": ("transformers", "accelerate")}


@dataclass(frozen=True)
class Block:
    index: int
    line: int            # of the opening fence, 1-based
    lang: str
    code: str
    not_run: str | None  # the reason given by a preceding <!-- not run: ... --> marker

    @property
    def first_line(self) -> str:
        return next((s for s in self.code.splitlines() if s.strip()), "")


def read_blocks(text: str) -> list[Block]:
    """The fenced code blocks of a Markdown text, in order."""
    blocks: list[Block] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        fence = re.match(r"^```(\w*)\s*$", lines[i])
        if fence is None:
            i += 1
            continue
        end = next((j for j in range(i + 1, len(lines)) if lines[j].startswith("```")), None)
        assert end is not None, f"README.md line {i + 1}: a code block that never closes"
        before = next((s for s in reversed(lines[:i]) if s.strip()), "")
        marker = re.fullmatch(r"\s*<!--\s*not run:\s*(.*?)\s*-->\s*", before)
        blocks.append(Block(len(blocks), i + 1, fence.group(1), "\n".join(lines[i + 1:end]) + "\n",
                            marker.group(1) if marker else None))
        i = end + 1
    return blocks


BLOCKS = read_blocks(README.read_text(encoding="utf-8"))
PYTHON = [b for b in BLOCKS if b.lang == "python"]


def _block_id(block: Block) -> str:
    return f"{block.index}-L{block.line}:{block.first_line[:60]}"


def _needs(block: Block) -> list[str]:
    """Modules a block needs beyond the test dependencies."""
    needed = [m for extra, modules in EXTRAS.items()
              if re.search(rf"^\s*(?:import|from) {extra}\b", block.code, re.M) for m in modules]
    if "s3://" in block.code:
        needed += ["s3fs", "moto.server"]
    return needed


def _environment(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1")  # no downloads
    # The blocks' models are tiny: one thread runs them fastest, and on a loaded 2-core machine a
    # second one spins (the SGD loop of the subspace block: 34 s with two threads, 7 s with one).
    env.setdefault("OMP_NUM_THREADS", "1")
    env.update(extra)
    return env


def _run(argv: list[str], cwd: Path, env: dict[str, str], what: str) -> subprocess.CompletedProcess[str]:
    try:
        done = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"{what} ran past {TIMEOUT} s; stderr:\n{(e.stderr or b'')[-3000:]!r}")
    assert done.returncode == 0, (f"{what} exited {done.returncode}\n--- stdout ---\n{done.stdout[-3000:]}"
                                  f"\n--- stderr ---\n{done.stderr[-6000:]}")
    return done


# ----------------------------------------------------------------------------------- S3: moto's server


@pytest.fixture(scope="module")
def moto_endpoint() -> object:
    from test_s3 import _start  # skips when s3fs or moto's server is missing

    server = _start()
    yield server.endpoint
    server.stop()


def _fresh_bucket(endpoint: str, bucket: str) -> None:
    """An empty moto with one bucket: nothing left from a block run before."""
    import fsspec

    urllib.request.urlopen(urllib.request.Request(f"{endpoint}/moto-api/reset", method="POST"), timeout=10).close()
    fs = fsspec.filesystem("s3", key="testing", secret="testing", client_kwargs={"endpoint_url": endpoint},
                           skip_instance_cache=True)
    fs.mkdir(bucket)


def _s3_environment(endpoint: str, tmp_path: Path) -> dict[str, str]:
    """Credentials and the endpoint where the README's S3 block reads them, and nothing from ~/.aws."""
    env = {k: v for k, v in _environment().items() if not k.startswith("AWS_")}
    env.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_ENDPOINT_URL_S3=endpoint,
               AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "no-credentials"),
               AWS_CONFIG_FILE=str(tmp_path / "no-config"), AWS_EC2_METADATA_DISABLED="true")
    return env


def _run_python_block(block: Block, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    for module in _needs(block):
        if importlib.util.find_spec(module.split(".")[0]) is None:
            pytest.skip(f"README block at line {block.line} needs {module}, not installed")
    env = _environment()
    if "s3://" in block.code:
        endpoint = request.getfixturevalue("moto_endpoint")
        for bucket in sorted(set(re.findall(r"s3://([^/\"']+)/", block.code))):
            _fresh_bucket(endpoint, bucket)
        env = _s3_environment(endpoint, tmp_path)
    script, argv = "block.py", [sys.executable, "block.py"]
    if block.first_line.startswith("# run with: torchrun"):
        shown = shlex.split(block.first_line.removeprefix("# run with: "))
        script = shown[-1]
        argv = [sys.executable, "-m", "torch.distributed.run", *shown[1:]]
    (tmp_path / script).write_text(block.code, encoding="utf-8")
    _run(argv, tmp_path, env, f"README.md's python block at line {block.line}")


# Every block pays for importing torch, trajstore (and Lightning or transformers) afresh: 5 to 20 s
# each on 2 cores, about 2 minutes together, so they are slow tests; the static checks are not.
@pytest.mark.slow
@pytest.mark.parametrize("block", [pytest.param(b, id=_block_id(b)) for b in PYTHON])
def test_python_block_runs(block: Block, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    if block.not_run is not None:
        pytest.skip(f"marked not run: {block.not_run}")
    _run_python_block(block, tmp_path, request)


def test_not_run_blocks_are_the_listed_few() -> None:
    skipped = [b.first_line for b in BLOCKS if b.not_run is not None]
    # every exception is deliberate: a new one is added here, with its reason in the README marker
    assert skipped == NOT_RUN, f"blocks marked not run: {skipped}"
    assert len(PYTHON) >= 10, f"only {len(PYTHON)} python blocks found in README.md"  # the parser found them


def test_no_block_hard_codes_a_basis_name() -> None:
    for block in BLOCKS:
        found = BASIS_NAME.findall(block.code)
        # a window's name exists only for that window: use basis.name, or name= of your own
        assert not found, f"README.md block at line {block.line} names basis {found[0]!r} literally"


def test_python_blocks_are_self_contained() -> None:
    """Each block imports what it uses: no block reads a name only another block defines."""
    for block in PYTHON:
        if "trajstore" in block.code:
            assert re.search(r"^\s*(?:import|from) trajstore\b", block.code, re.M), (
                f"README.md block at line {block.line} uses trajstore without importing it")


# ------------------------------------------------------------------------------ the shown commands


def _commands() -> list[tuple[Block, str, list[str]]]:
    """``(block, command, shown output lines)`` for every ``$ trajstore`` line of a text block;
    a trailing backslash continues the command on the next line."""
    found = []
    for block in BLOCKS:
        if block.lang not in ("text", "console"):
            continue
        lines = block.code.splitlines()
        i = 0
        while i < len(lines):
            if not lines[i].startswith("$ trajstore "):
                i += 1
                continue
            command = lines[i][2:]
            while command.endswith("\\"):
                i += 1
                command = command[:-1] + " " + lines[i].strip()
            output = []
            i += 1
            while i < len(lines) and not lines[i].startswith("$ "):
                output.append(lines[i])
                i += 1
            found.append((block, command, output))
    return found


COMMANDS = _commands()


def _command(name: str) -> tuple[Block, list[str], list[str]]:
    matches = [(b, shlex.split(c), out) for b, c, out in COMMANDS if shlex.split(c)[1] == name]
    assert len(matches) == 1, f"expected one `$ trajstore {name}` in README.md, found {len(matches)}"
    return matches[0]


def test_every_shown_command_is_run_here() -> None:
    # a new `$ trajstore ...` in the README gets a test below (or stays shown output, listed here)
    assert sorted(shlex.split(c)[1] for _, c, _ in COMMANDS) == ["info", "plan", "run", "verify"]


@pytest.mark.slow  # seconds of real processes: the full suite runs it, the everyday subset does not
def test_run_refusal_prints_the_shown_line(tmp_path: Path) -> None:
    """The refused ``run`` shown in the README prints that one line (to stderr, exit 2), from the
    config alone, and writes nothing."""
    block, argv, shown = _command("run")
    done = subprocess.run([sys.executable, "-m", "trajstore", *argv[1:]], cwd=tmp_path, env=_environment(),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines() == shown, f"README.md line {block.line}: run printed\n{done.stderr}"
    assert list(tmp_path.iterdir()) == []


def _trajstore(argv: list[str], cwd: Path, env: dict[str, str] | None = None) -> str:
    return _run([sys.executable, "-m", "trajstore", *argv[1:]], cwd, env or _environment(),
                f"`{shlex.join(argv)}`").stdout


_NUMBER = re.compile(r"[-+]?\d[\d,]*(?:\.\d+)?(?:e[-+]?\d+)?")


def _numbers(line: str) -> list[float]:
    return [float(m.replace(",", "")) for m in _NUMBER.findall(line)]


@pytest.mark.slow
def test_plan_prints_the_shown_table(tmp_path: Path) -> None:
    block, argv, shown = _command("plan")
    printed = _trajstore(argv, tmp_path).rstrip("\n").splitlines()
    assert len(printed) == len(shown), f"README.md line {block.line}: plan printed\n" + "\n".join(printed)
    for got, want in zip(printed, shown):
        assert _NUMBER.sub("N", got).split() == _NUMBER.sub("N", want).split(), (got, want)  # the same words
        # disk, GPU and I/O follow from the layout alone; host memory includes the interpreter's
        # own baseline (0.36 vs 0.37 GiB between runs), hence 0.05 GiB
        for a, b in zip(_numbers(got), _numbers(want)):
            assert abs(a - b) <= 0.05 + 1e-3 * abs(b), f"plan printed {got!r}, README.md shows {want!r}"


def _record_for_info(path: Path, snapshots: int, d: int, basis: str) -> None:
    """A trajectory of ``snapshots`` SGD steps of a small CNN with BatchNorm, shaped like the
    README's (lr missing at snapshot 0, then one), and a stored basis of d directions."""
    import torch
    from torch import nn

    from trajstore import Recorder, dldr

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(1, 32, 5), nn.BatchNorm1d(32), nn.ReLU(), nn.Conv1d(32, 32, 5),
                          nn.BatchNorm1d(32), nn.ReLU(), nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(32, 10))
    x, y = torch.randn(256, 1, 40), torch.randint(0, 10, (256,))
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    with Recorder(str(path), model, background=False) as recorder:
        for step in range(1, snapshots):
            batch = torch.randint(0, 256, (32,))
            sgd.zero_grad()
            nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
            sgd.step()
            recorder.snapshot(step=8 * step, epoch=(step + 3) // 4, lr=0.1)
    dldr(str(path), d, name=basis)


def _mask(line: str) -> list[str]:
    line = re.sub(r"\b[0-9a-f]{16}\b", "H", line)  # the layout fingerprint
    line = _NUMBER.sub("N", line)
    return re.sub(r"\b(?:B|KiB|MiB|GiB)\b", "U", line).split()


@pytest.mark.slow
def test_info_prints_the_shown_lines(tmp_path: Path) -> None:
    block, argv, shown = _command("info")
    basis = re.search(r"basis '([^']+)'", "\n".join(shown)).group(1)
    t = int(re.search(r"t = (\d+) snapshots", "\n".join(shown)).group(1))
    d = int(re.search(r", d = (\d+),", "\n".join(shown)).group(1))
    store = tmp_path / argv[2]
    store.parent.mkdir(parents=True)
    _record_for_info(store, t, d, basis)
    printed = _trajstore(argv, tmp_path).rstrip("\n").splitlines()
    # the same lines, numbers, sizes and fingerprint aside: the README shows what info prints today
    assert [_mask(s) for s in printed] == [_mask(s) for s in shown], (
        f"README.md line {block.line}: info printed\n" + "\n".join(printed))


@pytest.mark.slow
def test_verify_finds_nothing_wrong_with_the_s3_blocks_store(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    block, argv, shown = _command("verify")
    url = argv[2]
    writers = [b for b in PYTHON if f'"{url}"' in b.code and "create(" in b.code]
    assert len(writers) == 1, f"expected one python block that writes {url}"
    (tmp_path / "block").mkdir()
    _run_python_block(writers[0], tmp_path / "block", request)  # it writes the store the command verifies
    endpoint = request.getfixturevalue("moto_endpoint")
    # the endpoint shown is an example; moto listens on a port of its own, given as the command
    # gives it (not through the environment, where botocore would find it without the option)
    argv = [a.replace("http://127.0.0.1:9000", endpoint) for a in argv]
    env = _s3_environment(endpoint, tmp_path)
    del env["AWS_ENDPOINT_URL_S3"]
    out = _trajstore(argv, tmp_path, env)
    assert "OK, 0 warnings" in out, out
