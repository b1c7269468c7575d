"""The README's shell commands, checked and run as a new user would.

Every fenced `bash` block of README.md is parsed. In all of them, each `python -m experiments.X` launcher must
exist and define the flags the command gives it, each `--config=PATH[:ARG]` must load, and each
`--config.KEY=VALUE` must name a key of that config. A block preceded by an HTML comment `<!-- long: why -->`
stops there (downloads, GPU runs, the main job). Every other block must use only the built-in data and the
`:tiny` config, and its commands run as written, in order, in a copy of the repository (so that `workdirs/`
and the other relative outputs land in a temporary directory), with `python` meaning this interpreter.
"""

import dataclasses
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time

import pytest
from conftest import REPO, subprocess_env

README = os.path.join(REPO, "README.md")
LONG_MARK = re.compile(r"<!--\s*long\b")
# Flags that absl defines for every launcher.
ABSL_FLAGS = {
    "help",
    "helpfull",
    "helpshort",
    "helpxml",
    "verbosity",
    "v",
    "logtostderr",
    "alsologtostderr",
    "log_dir",
    "flagfile",
}
DEFINE = re.compile(r"DEFINE_\w+\(\s*(?:name\s*=\s*)?[\"'](\w+)[\"']")


@dataclasses.dataclass
class Block:
    line: int  # 1-based line of the opening fence.
    long: bool
    commands: list[str]


def bash_blocks(text: str) -> list[Block]:
    """The fenced `bash` blocks of a markdown text, each with its commands (continuations joined, comments
    and blank lines dropped) and whether a `<!-- long -->` comment precedes it."""
    blocks = []
    lines = text.splitlines()
    i = 0
    previous = ""
    while i < len(lines):
        line = lines[i]
        if line.startswith("```"):
            start = i
            language = line[3:].strip()
            body = []
            i += 1
            while i < len(lines) and not lines[i].startswith("```"):
                body.append(lines[i])
                i += 1
            assert i < len(lines), f"README line {start + 1}: code block never closed"
            if language == "bash":
                source = "\n".join(body).replace("\\\n", " ")
                commands = [
                    c.strip()
                    for c in source.splitlines()
                    if c.strip() and not c.strip().startswith("#")
                ]
                blocks.append(
                    Block(start + 1, bool(LONG_MARK.search(previous)), commands)
                )
            previous = ""
        elif line.strip():
            previous = line
        i += 1
    return blocks


def launches(command: str) -> list[list[str]]:
    """The argument lists of the `python -m MODULE ...` calls of one shell line (split at && ; &)."""
    calls, current = [], []
    for token in shlex.split(command) + ["&&"]:
        if token in ("&&", ";", "&", "||"):
            if current[:2] == ["python", "-m"]:
                calls.append(current)
            current = []
        else:
            current.append(token)
    return calls


def defined_flags(module: str) -> set[str]:
    path = os.path.join(REPO, *module.split(".")) + ".py"
    with open(path) as f:
        return set(DEFINE.findall(f.read())) | ABSL_FLAGS


def option(args: list[str], name: str) -> str | None:
    for arg in args:
        if arg.startswith(f"--{name}="):
            return arg.split("=", 1)[1]
    return None


def load_config(spec: str):
    path, _, arg = spec.partition(":")
    module_spec = importlib.util.spec_from_file_location(
        "readme_config", os.path.join(REPO, path)
    )
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg)


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


BLOCKS = bash_blocks(_read(README))
# The launcher calls of every block, as (README line, argument list).
CALLS = [
    (b.line, call)
    for b in BLOCKS
    for c in b.commands
    for call in launches(c)
    if call[2].startswith("experiments.")
]


def test_readme_has_runnable_and_long_blocks():
    assert BLOCKS, "no bash block found in README.md"
    assert any(b.long for b in BLOCKS) and any(not b.long for b in BLOCKS)
    for block in BLOCKS:
        assert block.commands, f"README line {block.line}: empty bash block"
        for command in block.commands:
            for call in launches(command):
                assert call[2].startswith("experiments.") or call[2] == "pytest", (
                    f"README line {block.line}: python -m {call[2]}"
                )


def test_ci_runs_the_readme_test_command():
    # .ci/run must call the README's test command exactly, so that the README says what CI does.
    with open(os.path.join(REPO, ".ci", "run")) as f:
        ci = f.read().splitlines()
    test_commands = [c for b in BLOCKS for c in b.commands if "pytest" in c]
    assert len(test_commands) == 1, test_commands
    assert test_commands[0] in ci


@pytest.mark.parametrize("line, call", CALLS, ids=[f"line{n}-{c[2]}" for n, c in CALLS])
def test_launcher_flags_and_config_keys_exist(line, call):
    module = call[2]
    where = f"README line {line}: {module}"
    assert os.path.exists(os.path.join(REPO, *module.split(".")) + ".py"), where
    known = defined_flags(module)
    flag_names = [a[2:].split("=")[0] for a in call[3:] if a.startswith("--")]
    for name in flag_names:
        if not name.startswith("config."):
            assert name in known or name.removeprefix("no") in known, (
                f"{where}: unknown flag --{name}"
            )
    config_spec = option(call, "config")
    if config_spec is None:
        assert not any(n.startswith("config.") for n in flag_names), where
        return
    config_path = config_spec.partition(":")[0]
    assert os.path.exists(os.path.join(REPO, config_path)), (
        f"{where}: no file {config_path}"
    )
    config = load_config(config_spec)  # Also rejects an unknown ARG after the colon.
    for name in flag_names:
        if name.startswith("config."):
            node = config
            for key in name.split(".")[1:]:
                assert key in node, f"{where}: --{name} is not a key of {config_path}"
                node = node[key]


def _heading_anchor(heading: str) -> str:
    slug = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return slug.replace(" ", "-")


@pytest.mark.parametrize(
    "page",
    [
        "README.md",
        "docs/README.md",
        "docs/design.md",
        "docs/demo_experiments.md",
        "docs/benchmarks.md",
    ],
)
def test_relative_links_resolve(page):
    path = os.path.join(REPO, page)
    with open(path) as f:
        text = f.read()
    for target, anchor in re.findall(r"\]\(([^)#\s]*)(#[^)\s]*)?\)", text):
        if target.startswith(("http://", "https://")):
            continue
        linked = (
            os.path.normpath(os.path.join(os.path.dirname(path), target))
            if target
            else path
        )
        assert os.path.exists(linked), f"{page}: broken link {target}"
        if anchor and linked.endswith(".md"):
            # Headings outside code blocks.
            prose = re.sub(
                r"^```.*?^```", "", _read(linked), flags=re.MULTILINE | re.DOTALL
            )
            headings = [
                _heading_anchor(h)
                for h in re.findall(r"^#+ (.+)$", prose, re.MULTILINE)
            ]
            assert anchor[1:] in headings, f"{page}: no heading for {target}{anchor}"


def _check_cheap(line: int, call: list[str]) -> None:
    where = f"README line {line} ({' '.join(call[:3])}) is not marked <!-- long --> but"
    module = call[2]
    assert module.startswith("experiments."), f"{where} runs {module}"
    config = option(call, "config")
    if config is not None:
        assert (
            config.startswith("experiments/configs/shapes.py:")
            and "tiny" in config.split(":")[1]
        ), f"{where} does not use the built-in data with :tiny"
    if module == "experiments.train":
        assert config is not None
    dataset = option(call, "dataset")
    if dataset is not None:
        assert dataset.startswith("shapes/") and option(call, "manual_dir") is None, (
            f"{where} prepares a downloaded dataset"
        )


def _check_outputs(call: list[str], cwd: str, stdout: str) -> None:
    """What the README says each launcher leaves behind."""
    module = call[2]
    if module == "experiments.train":
        # The printed table's columns, and the same metrics in the workdir.
        assert re.search(r"miou\s+miou_all\s+ari_fg\s+msc_fg\s+mse\s+images", stdout), (
            stdout[-2000:]
        )
        with open(
            os.path.join(cwd, option(call, "workdir"), "eval", "test", "metrics.json")
        ) as f:
            metrics = json.load(f)
        assert {"miou", "miou_all", "ari_fg", "msc_fg", "mse"} <= set(metrics)
        assert os.path.exists(os.path.join(cwd, option(call, "workdir"), "config.json"))
    elif module == "experiments.prepare_data" and option(call, "export_images"):
        exported = os.listdir(os.path.join(cwd, option(call, "export_images")))
        assert len(exported) == int(option(call, "num_images") or 8), exported
    elif module == "experiments.segment":
        inputs = os.listdir(os.path.join(cwd, option(call, "input")))
        outputs = set(os.listdir(os.path.join(cwd, option(call, "output"))))
        for name in inputs:
            stem = os.path.splitext(name)[0]
            for suffix in ("_labels.png", "_overlay.png", "_objects.json"):
                assert stem + suffix in outputs, sorted(outputs)


def test_short_readme_commands_run_as_written(tmp_path):
    blocks = [b for b in BLOCKS if not b.long]
    calls = [(b.line, call) for b in blocks for c in b.commands for call in launches(c)]
    for block in blocks:
        # Only `python -m` commands can run here; anything else in an unmarked block is a mistake.
        assert all(launches(c) for c in block.commands), (
            f"README line {block.line}: {block.commands}"
        )
    for line, call in calls:
        _check_cheap(line, call)
    # A copy of what a fresh clone has at its root; the package itself is imported from this checkout.
    clone = tmp_path / "clone"
    for name in ("experiments", "datasets"):
        shutil.copytree(
            os.path.join(REPO, name),
            clone / name,
            ignore=shutil.ignore_patterns("__pycache__"),
        )
    env = subprocess_env(devices=1)
    # The built-in dataset is built here, not in the user's ~/tensorflow_datasets.
    env["TFDS_DATA_DIR"] = str(tmp_path / "tensorflow_datasets")
    for line, call in calls:
        start = time.time()
        proc = subprocess.run(
            [sys.executable, *call[1:]],
            cwd=clone,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
        seconds = time.time() - start
        print(f"README line {line}: {shlex.join(call)}: {seconds:.0f} s")
        assert proc.returncode == 0, (
            f"README line {line}: {shlex.join(call)}\n{proc.stderr[-4000:]}"
        )
        _check_outputs(call, str(clone), proc.stdout)
