"""The docs are true: what README.md and docs/*.md show a user exists in the code.

* every ``qualiface ...`` command in a shell block or an inline span names a real sub-command
  and only options that command has (``qualiface <cmd> --help``); every ``--option`` mentioned
  on its own in the text exists on some command;
* every config key the docs name (``train.deterministic``, ``pipeline.eqface.s_th``, a
  ``key=value`` override of ``qualiface train`` or ``demo --set``) is a field of the typed
  config, and the defaults the docs state are the dataclasses' and heads' defaults;
* docs/ARCHITECTURE.md names every module of the package, each in its own package's section,
  and nothing that does not exist; its layer diagram holds for every import in the source;
* the ```python snippets run.

Static (no training, no data, no network): the command tree comes from the typer app, whose
modules import the library lazily.
"""

from __future__ import annotations

import dataclasses
import re
import shlex
import typing
from pathlib import Path

import pytest
import typer.main

from test_architecture import PACKAGE_ROOT, qualiface_imports

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
ARCHITECTURE = REPO / "docs" / "ARCHITECTURE.md"
DOCS = [README, *sorted((REPO / "docs").glob("*.md"))]
DOC_IDS = [str(p.relative_to(REPO)) for p in DOCS]

FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
SPAN = re.compile(r"`([^`]+)`")


def fenced_blocks(text: str, *languages: str) -> list[str]:
    return [body for lang, body in FENCE.findall(text) if lang in languages]


def inline_spans(text: str) -> list[str]:
    """Inline code spans outside fenced blocks (a span may wrap onto the next line)."""
    return [" ".join(span.split()) for span in SPAN.findall(FENCE.sub("", text))]


def shell_lines(block: str) -> list[str]:
    """Commands of a shell block: continuation lines joined, trailing comments dropped."""
    joined = re.sub(r"\\\n\s*", " ", block)
    return [re.sub(r"\s#.*$", "", line).strip() for line in joined.splitlines() if line.strip()]


def qualiface_argv(command: str) -> list[str] | None:
    """The arguments after ``qualiface`` (also ``-m qualiface``, ``.venv/bin/qualiface`` and
    ``quickstart.py demo``, which runs ``qualiface demo``), or None for another program."""
    try:
        tokens = shlex.split(command)
    except ValueError:
        tokens = command.split()
    # `[--fp16]`, `[--detector yunet|dlib]`: optional parts, written in brackets
    tokens = [t.strip("[]") for t in tokens if t.strip("[]")]
    for i, token in enumerate(tokens):
        if token == "qualiface" or token.endswith("/qualiface"):
            return tokens[i + 1:]
        if token.endswith("quickstart.py") and tokens[i + 1:i + 2] == ["demo"]:
            return tokens[i + 1:]
    return None


def documented_commands(path: Path) -> list[list[str]]:
    text = path.read_text(encoding="utf-8")
    commands = [line for block in fenced_blocks(text, "bash", "sh", "") for line in shell_lines(block)]
    # an inline span is a command when it starts with one (not a message quoting the word)
    starts = r"(qualiface|\S*/qualiface|python3? -m qualiface|python3 quickstart\.py) "
    commands += [span for span in inline_spans(text)
                 if re.match(starts, span + " ") or re.match(r"(time|nice|torchrun) .*\bqualiface ", span)]
    return [argv for argv in map(qualiface_argv, commands) if argv]


CLI = typer.main.get_command(__import__("qualiface.cli", fromlist=["app"]).app)


def is_group(command) -> bool:
    return isinstance(getattr(command, "commands", None), dict)


def resolve(argv: list[str]) -> tuple[list[str], typing.Any, list[str]]:
    """(sub-command path, its command object, the remaining arguments)."""
    command, path = CLI, []
    rest = list(argv)
    while is_group(command) and rest and rest[0] in command.commands:
        path.append(rest[0])
        command = command.commands[rest.pop(0)]
    return path, command, rest


def option_names(command) -> set[str]:
    return {name for param in command.params for name in (*param.opts, *param.secondary_opts)
            if name.startswith("-")} | {"--help"}


def all_option_names(command=None) -> set[str]:
    command = CLI if command is None else command
    names = option_names(command)
    for sub in getattr(command, "commands", {}).values():
        names |= all_option_names(sub)
    return names


@pytest.mark.parametrize("doc", DOCS, ids=DOC_IDS)
def test_every_documented_qualiface_command_and_option_exists(doc):
    problems = []
    commands = documented_commands(doc)
    for argv in commands:
        path, command, rest = resolve(argv)
        shown = " ".join(["qualiface", *argv])
        if is_group(command) and rest and rest[0] not in option_names(command):
            problems.append(f"{shown}: '{rest[0]}' is not a sub-command of "
                            f"'qualiface {' '.join(path)}' ({', '.join(command.commands)})")
            continue
        known = option_names(command)
        for token in rest:
            name = token.split("=", 1)[0]
            if name.startswith("--") and name not in known:
                problems.append(f"{shown}: 'qualiface {' '.join(path)}' has no option {name}")
    assert problems == []
    if doc == README:
        assert commands, "the walker found no command in the README"


BENCH_OPTIONS = {m for p in (REPO / "bench").glob("*.py")
                 for m in re.findall(r"add_argument\(\s*\"(--[\w-]+)\"", p.read_text(encoding="utf-8"))}


@pytest.mark.parametrize("doc", [README, ARCHITECTURE, REPO / "docs" / "SCALING.md"],
                         ids=lambda p: p.name)
def test_every_option_named_in_the_text_exists(doc):
    """``--threads``, ``--degrade``, ``--fit-qmagface`` ...: an option named on its own in the
    prose is an option of some ``qualiface`` command (or of a ``bench/`` script; torchrun's
    options are spelled with underscores)."""
    known = all_option_names() | BENCH_OPTIONS
    named = {span.split()[0].split("=")[0] for span in inline_spans(doc.read_text(encoding="utf-8"))
             if span.startswith("--")}
    unknown = sorted(n for n in named if n not in known and "_" not in n)
    assert unknown == []


# --------------------------------------------------------------------------- config keys

SECTIONS = ("model", "head", "data", "val", "optim", "schedule", "train", "pipeline", "distributed")
KEY = re.compile(rf"^(?:{'|'.join(SECTIONS)})(?:\.[A-Za-z_]\w*)+")


def config_key_problem(key: str) -> str | None:
    """None when ``key`` (dotted) names a field of ``TrainingConfig``, else why not."""
    from qualiface.config import TrainingConfig
    from qualiface.methods import method_options

    parts = key.split(".")
    if parts[0] == "pipeline":
        if len(parts) == 1 or parts[1:] == ["name"]:
            return None
        options = method_options()
        if parts[1] not in options:
            return f"{key}: no pipeline section '{parts[1]}' (known: name, {', '.join(options)})"
        fields = {f.name for f in dataclasses.fields(options[parts[1]])}
        if len(parts) > 2 and (parts[2] not in fields or len(parts) > 3):
            return f"{key}: not an option of pipeline.{parts[1]} ({', '.join(sorted(fields))})"
        return None
    cls = TrainingConfig
    for depth, part in enumerate(parts):
        hints = typing.get_type_hints(cls)
        if part not in hints:
            return f"{key}: '{'.'.join(parts[:depth + 1])}' is not a config key"
        cls = hints[part]
        if cls is dict or typing.get_origin(cls) is dict:  # free-form params: anything below
            return None
        if not dataclasses.is_dataclass(cls):
            return None if depth == len(parts) - 1 else f"{key}: '{part}' has no sub-keys"
    return None


def is_module_path(dotted: str) -> bool:
    """``train.loop``, ``data.decode.DataError``: a path into the package, not a config key."""
    parts = dotted.split(".")
    for n in range(len(parts), 0, -1):
        base = PACKAGE_ROOT.joinpath(*parts[:n])
        if base.with_suffix(".py").is_file() or (base / "__init__.py").is_file():
            return n > 1 or len(parts) == 1
    return False


#: Docs whose prose names config keys; the others (RELIABILITY, BENCHMARKS) also name checkpoint
#: and result fields (``data.fingerprint``, ``train.commits``) and deliberately wrong keys.
PROSE_KEY_DOCS = ("README.md", "ARCHITECTURE.md", "SCALING.md")


def documented_config_keys(doc: Path) -> list[str]:
    """Config keys in the overrides of documented commands, and (``PROSE_KEY_DOCS``) in inline
    spans that start with a config section (``train.deterministic: true``)."""
    from qualiface.cli.train import SHORTCUTS

    text = doc.read_text(encoding="utf-8")
    keys = ([m.group(0) for span in inline_spans(text) for m in [KEY.match(span)] if m]
            if doc.name in PROSE_KEY_DOCS else [])
    for argv in documented_commands(doc):
        path, _command, rest = resolve(argv)
        if path == ["train"]:
            overrides = [t for t in rest[1:] if "=" in t and not t.startswith("-")]
        elif path == ["demo"]:
            overrides = [b for a, b in zip(rest, rest[1:]) if a == "--set"]
        else:
            continue
        for override in overrides:
            key = override.split("=", 1)[0]
            keys.append(f"train.{key}" if key in SHORTCUTS else key)
    return [k for k in keys if not is_module_path(k) and k.rsplit(".", 1)[-1] not in FILE_TYPES]


#: ``model.json``, ``train.rec``, ``checkpoint.pt.sha256``: file names, not config keys.
FILE_TYPES = {"json", "jsonl", "yaml", "txt", "rec", "idx", "bin", "pt", "sha256", "md", "html",
              "png", "npz", "npy", "parquet", "onnx", "safetensors", "tsv", "py"}


def params_key_problem(key: str) -> str | None:
    """``head.params.X`` / ``model.params.X``: ``X`` is a keyword of some registered head /
    backbone (the free-form sections are checked against the constructors at start-up)."""
    import inspect

    from qualiface.backbones import BACKBONES
    from qualiface.backbones import _load_all as load_backbones
    from qualiface.heads import HEADS
    from qualiface.heads import _load_all as load_heads

    parts = key.split(".")
    if parts[0] not in ("head", "model") or parts[1:2] != ["params"] or len(parts) < 3:
        return None
    registry, load = (HEADS, load_heads) if parts[0] == "head" else (BACKBONES, load_backbones)
    load()
    known = {name for entry in registry.names()
             for name in inspect.signature(registry.get(entry)).parameters}
    return None if parts[2] in known else f"{key}: no {parts[0]} takes '{parts[2]}'"


@pytest.mark.parametrize("doc", DOCS, ids=DOC_IDS)
def test_every_documented_config_key_exists(doc):
    keys = documented_config_keys(doc)
    problems = [p for key in keys for p in (config_key_problem(key), params_key_problem(key)) if p]
    assert problems == []


def test_the_train_shortcuts_are_the_documented_ones():
    """README: "the everyday `train` keys (`resume`, ...) may drop their `train.` prefix"."""
    from qualiface.cli.train import SHORTCUTS

    readme = " ".join(README.read_text(encoding="utf-8").split())
    listed = re.search(r"the everyday `train` keys \(([^)]*)\) may drop their `train\.` prefix", readme)
    assert listed, "README no longer lists the train shortcuts"
    assert re.findall(r"`(\w+)`", listed.group(1)) == list(SHORTCUTS)
    assert all(config_key_problem(f"train.{key}") is None for key in SHORTCUTS)


def test_the_config_key_check_sees_a_wrong_key():
    assert config_key_problem("train.deterministic") is None
    assert config_key_problem("head.params.lambda_g") is None
    assert config_key_problem("pipeline.eqface.s_th") is None
    assert "not a config key" in config_key_problem("train.devices")
    assert "pipeline.eqface" in config_key_problem("pipeline.eqface.sth")
    assert params_key_problem("head.params.contrastive_start_step") is None
    assert "no head takes" in params_key_problem("head.params.lambda")
    assert is_module_path("train.loop") and is_module_path("data.decode.DataError")
    assert not is_module_path("data.num_workers")


def test_defaults_stated_in_the_docs_are_the_code_defaults():
    from qualiface.config import CHOICES, DistributedConfig, TrainConfig
    from qualiface.heads import HEADS, _load_all

    readme = " ".join(README.read_text(encoding="utf-8").split())
    scaling = " ".join((REPO / "docs" / "SCALING.md").read_text(encoding="utf-8").split())
    distributed = DistributedConfig()
    # SCALING: "r = 1 (default) is exact"; "default 1800 s"; "`auto` (NCCL with CUDA, else gloo)"
    assert "r = 1 (default)" in scaling and distributed.sample_rate == 1.0
    assert "default 1800 s" in scaling and distributed.timeout_s == 1800.0
    assert "`distributed.backend`: `auto` (NCCL with CUDA, else gloo), `nccl` or `gloo`" in scaling
    assert distributed.backend == "auto" and CHOICES["distributed.backend"] == ("auto", "nccl", "gloo")
    # README: "`train.deterministic: true` makes GPU runs bitwise repeatable" (off by default)
    assert "`train.deterministic: true`" in readme and TrainConfig().deterministic is False

    # README "Methods": scale s = 64, ArcFace m = 0.5, CosFace m = 0.35, MV-Softmax t = 1.2,
    # MagFace's norm clamped to [10, 110].
    import inspect

    _load_all()

    def default(head: str, name: str):
        return inspect.signature(HEADS.get(head)).parameters[name].default

    assert "scaled by `s = 64`" in readme
    assert {default(h, "scale") for h in ("arcface", "cosface", "combined", "curricular", "magface",
                                          "adaface", "mv-softmax", "qcface", "qgface")} == {64.0}
    assert "ArcFace = (1, 0.5, 0), CosFace = (1, 0, 0.35)" in readme
    assert default("arcface", "margin") == 0.5 and default("cosface", "margin") == 0.35
    assert "(t = 1.2)" in readme and default("mv-softmax", "t") == 1.2
    assert "(clamped to [10, 110])" in readme
    assert (default("magface", "l_a"), default("magface", "u_a")) == (10.0, 110.0)


# --------------------------------------------------------------------------- ARCHITECTURE.md


def architecture_sections() -> dict[str, str]:
    """``{package folder ('' for the top level): its section's text}``."""
    sections = {}
    for chunk in re.split(r"^## ", ARCHITECTURE.read_text(encoding="utf-8"), flags=re.M)[1:]:
        title, _, body = chunk.partition("\n")
        folder = re.fullmatch(r"`(\w+)/`", title.strip())
        sections["" if title.strip() == "Top level" else folder.group(1) if folder else title] = body
    return sections


def package_modules() -> dict[str, list[str]]:
    """``{package folder ('' for the top level): [module file names]}``, ``__init__`` aside."""
    found: dict[str, list[str]] = {}
    for path in sorted(PACKAGE_ROOT.rglob("*.py")):
        relative = path.relative_to(PACKAGE_ROOT)
        if path.name in ("__init__.py", "__main__.py"):
            continue
        folder = relative.parts[0] if len(relative.parts) > 1 else ""
        found.setdefault(folder, []).append(relative.as_posix())
    return found


def test_architecture_has_a_section_for_every_package_and_no_other():
    packages = {p.name for p in PACKAGE_ROOT.iterdir() if p.is_dir() and any(p.glob("*.py"))}
    sections = {name for name in architecture_sections() if name and name.isidentifier()}
    assert sections - {"bench"} == packages


def test_architecture_names_every_module_in_its_section():
    sections = architecture_sections()
    missing = []
    for folder, modules in package_modules().items():
        if folder == "cli":
            continue  # one module per sub-command: checked below
        named = {name for bold in re.findall(r"\*\*(.+?)\*\*", sections[folder])
                 for name in re.findall(r"`([\w.]+\.py)`", bold)}
        missing += [m for m in modules if Path(m).name not in named]
    assert missing == []


def test_architecture_names_no_module_that_does_not_exist():
    stale = []
    for folder, body in architecture_sections().items():
        root = REPO / "bench" if folder == "bench" else PACKAGE_ROOT / folder
        for name in re.findall(r"\*\*`([\w.]+\.py)`\*\*|`([\w]+\.py)`", body):
            name = name[0] or name[1]
            if not list(root.rglob(name)):
                stale.append(f"{folder}/{name}")
    assert stale == []


def test_architecture_lists_the_cli_sub_commands_and_every_bench_script():
    body = architecture_sections()["cli"]
    listed = re.search(r"one module per sub-command: ([^.]+)\.", body).group(1)
    commands = set(re.findall(r"`(\w+)`", listed))
    modules = {Path(m).stem for m in package_modules()["cli"]} - {"common"}
    assert commands == modules == set(CLI.commands)
    bench = architecture_sections()["bench"] + ARCHITECTURE.read_text(encoding="utf-8")
    scripts = {p.name for p in (REPO / "bench").glob("*.py")} - {"common.py"}
    assert {s for s in scripts if f"`{s}`" not in bench and f"bench/{s}" not in bench} == set()


def diagram_layers() -> dict[str, tuple[int, int]]:
    """The layer diagram at the top of ARCHITECTURE.md: ``{unit: (indent, line number)}``, a
    unit being a sub-package or a top-level module (``errors``, ``demo``...)."""
    block = re.search(r"^```\n(.*?)^```", ARCHITECTURE.read_text(encoding="utf-8"), re.S | re.M).group(1)
    layers = {}
    for number, line in enumerate(block.splitlines()):
        indent = len(line) - len(line.lstrip())
        for token in line.split():  # the left column: names up to the first word of text
            unit = re.fullmatch(r"(\w+)(?:/|\.py)", token)
            if unit is None:
                break
            layers[unit.group(1)] = (indent, number)
    return layers


def test_the_diagram_shows_every_package_and_top_level_module():
    units = {p.stem for p in PACKAGE_ROOT.iterdir()
             if (p.is_dir() and any(p.glob("*.py")))
             or (p.suffix == ".py" and p.stem not in ("__init__", "__main__"))}
    assert set(diagram_layers()) == units


def test_no_import_points_up_the_diagram():
    """An import goes to a unit drawn further right (lower) in the diagram, or stays on its own
    line (``cli/ demo.py``, ``errors.py files.py``). The stated exceptions: ``train/`` uses
    ``eval/`` (held-out validation and its report), and ``config.py`` (drawn apart) is read by
    ``train/``, ``cli/`` and ``demo.py`` and itself reads the registries and ``methods/``."""
    layers = diagram_layers()
    allowed = {("train", "eval")}
    config_users = {"train", "cli", "demo"}
    bad = []
    for unit in layers:
        for module, targets in qualiface_imports(unit).items():
            for target in sorted(targets):
                parts = target.split(".")
                if len(parts) < 2 or parts[1] not in layers or parts[1] == unit:
                    continue  # ``qualiface`` itself (__version__), or inside the unit
                other = parts[1]
                if other == "config":
                    ok = unit in config_users
                elif unit == "config":
                    ok = layers[other][0] >= layers["methods"][0]
                else:
                    (indent, line), (other_indent, other_line) = layers[unit], layers[other]
                    ok = other_indent > indent or line == other_line or (unit, other) in allowed
                if not ok:
                    bad.append(f"{module} -> {target}")
    assert bad == []


# --------------------------------------------------------------------------- python snippets


def python_snippets() -> list[tuple[str, str]]:
    return [(f"{doc.relative_to(REPO)}#{i}", block) for doc in DOCS
            for i, block in enumerate(fenced_blocks(doc.read_text(encoding="utf-8"), "python"))]


@pytest.mark.parametrize("where,snippet", python_snippets(), ids=[w for w, _ in python_snippets()])
def test_python_snippets_run(where, snippet, tmp_path, monkeypatch):
    """Each snippet runs as shown, with the names it takes from the surrounding text provided:
    a model package at ``runs/x/model`` (a tiny IResNet with the documented 112x112 input) and
    ``images``, a uint8 (B, 3, 112, 112) RGB batch."""
    import torch

    from qualiface.backbones import build_backbone
    from qualiface.heads.quality import NormQuality
    from qualiface.package.io import save_model_package

    monkeypatch.chdir(tmp_path)
    kwargs = {"embedding_size": 16, "input_size": 112, "base_width": 4}
    torch.manual_seed(0)
    backbone = build_backbone("iresnet-nano", **kwargs).eval()
    save_model_package(tmp_path / "runs" / "x" / "model", backbone=backbone,
                       backbone_name="iresnet-nano", backbone_kwargs=kwargs,
                       quality_estimator=NormQuality(), head_name="arcface")
    namespace = {"images": torch.randint(0, 256, (3, 3, 112, 112), dtype=torch.uint8)}
    exec(compile(snippet, where, "exec"), namespace)
    if "embeddings" in namespace:  # README: `embeddings, quality = model.embed(images)`
        assert namespace["embeddings"].shape == (3, 16) and namespace["quality"].shape == (3,)
