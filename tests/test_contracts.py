"""Each data-contract file is read through its owner module, and nowhere else.

docs/architecture.md ("Data contracts and their owners") names one module per contract file;
the owner writes it and holds its readers, so a change of layout, dtype or location is made
in one place. This test scans the source of pipeline/ and stages/ (AST, no imports) and
fails when a module that does not own a contract

- calls a raw reader (``pd.read_parquet``, ``pq.read_table``, ``pq.ParquetFile``,
  ``np.load``, ``json.load``, ``read_json``, ``read_meta``, ``open``, ``Path.read_text`` ...)
  on that contract, recognised by a string naming the file or by the name of the variable
  or argument that holds its path (``tokens_path``, ``args.clusters``); or
- builds the contract's path from its file name (``root / "labels.parquet"``,
  ``Path(...)``, ``joinpath``, or a constant ``LABELS = "labels.parquet"``), since locating
  the file is the owner's job too. Docstrings, error messages and command-line defaults may
  name the file.

The message names the file and the owner's reader to call instead.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# contract file -> (owner modules, the reader(s) a non-owner calls instead)
CONTRACTS: dict[str, tuple[tuple[str, ...], str]] = {
    "docs.parquet": (("pipeline/lm/corpus.py",), "pipeline.lm.corpus (build_corpus / docs_table)"),
    "tokens.parquet": (
        ("pipeline/lm/corpus.py",),
        "pipeline.lm.corpus.read_tokens (TokenTable), read_token_strings, read_token_texts or count_tokens",
    ),
    "_meta.json": (
        ("pipeline/lm/partitions.py", "pipeline/lm/losses.py"),
        "pipeline.lm.partitions.read_partition_meta",
    ),
    "labels.parquet": (
        ("pipeline/planted/suite.py",),
        "pipeline.planted.suite.read_labels, sample_quanta or has_ground_truth",
    ),
    "quanta.parquet": (("pipeline/planted/suite.py",), "pipeline.planted.suite.read_quanta"),
    "probe.parquet": (("pipeline/planted/suite.py",), "pipeline.planted.suite.read_probe_losses"),
    "samples.parquet": (("pipeline/qdg/selection.py",), "pipeline.qdg.selection.read_samples"),
    "gradients.npy": (("pipeline/qdg/gradients.py", "pipeline/qdg/gradient_files.py"),
                      "pipeline.qdg.gradient_files.read_gradients"),
    "gradients.parquet": (("pipeline/qdg/gradients.py", "pipeline/qdg/gradient_files.py"),
                          "pipeline.qdg.gradient_files.read_bad"),
    "clusters.parquet": (
        ("pipeline/qdg/clustering.py",),
        "pipeline.qdg.clustering.read_clusters (and sweep_columns for its k<k> columns)",
    ),
    "cluster_summary.parquet": (("pipeline/qdg/clustering.py",), "pipeline.qdg.clustering.read_summary"),
    "token_curves.parquet": (("pipeline/laws/scaling.py",), "pipeline.laws.scaling (ScalingRun.curves_table)"),
    "cluster_curves.parquet": (("pipeline/laws/cluster_curves.py",), "pipeline.laws.cluster_curves.read_curves"),
    "cluster_emergence.parquet": (("pipeline/laws/cluster_curves.py",), "pipeline.laws.cluster_curves.read_emergence"),
}

# Names of variables, arguments and `args.<name>` attributes that hold a contract's path.
PATH_NAMES: dict[str, str] = {
    "tokens": "tokens.parquet",
    "tokens_path": "tokens.parquet",
    "corpus_tokens": "tokens.parquet",
    "docs": "docs.parquet",
    "docs_path": "docs.parquet",
    "labels_path": "labels.parquet",
    "samples": "samples.parquet",
    "samples_path": "samples.parquet",
    "gradients": "gradients.npy",
    "gradients_path": "gradients.npy",
    "clusters": "clusters.parquet",
    "clusters_path": "clusters.parquet",
    "summary": "cluster_summary.parquet",
    "summary_path": "cluster_summary.parquet",
    "meta_path": "_meta.json",
    "curves_path": "cluster_curves.parquet",
    "emergence": "cluster_emergence.parquet",
    "emergence_path": "cluster_emergence.parquet",
}

# Raw readers: calls by these names (``pd.read_parquet``, ``path.read_text()``, ``open``).
RAW_READERS = {
    "read_parquet", "read_table", "ParquetFile", "dataset", "load", "loads", "read_json",
    "read_meta", "read_text", "read_bytes", "open", "read_csv",
}

# Calls that build a path from their string arguments.
PATH_BUILDERS = {"Path", "PurePath", "joinpath", "join", "with_name"}

# Raw reads that wait for a reader in their owner: (module, contract) -> the reader it needs.
# An entry that no longer matches a read fails the test, so the list only shrinks.
PENDING: dict[tuple[str, str], str] = {}


def _mentions(text: str) -> list[str]:
    """Contract files that the string `text` names (as a whole file name, not a suffix of one)."""
    return [c for c in CONTRACTS if re.search(r"(?<![\w.])" + re.escape(c) + r"(?![\w])", text)]


def _call_name(call: ast.Call) -> str:
    f = call.func
    return f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""


def _contracts_in(node: ast.AST) -> set[str]:
    """Contracts an expression refers to: by a string naming the file, or by a path variable's name."""
    found: set[str] = set()
    for sub in ast.walk(node):
        if isinstance(sub, ast.Constant) and isinstance(sub.value, str):
            found.update(_mentions(sub.value))
        elif isinstance(sub, ast.Name) and sub.id in PATH_NAMES:
            found.add(PATH_NAMES[sub.id])
        elif isinstance(sub, ast.Attribute) and sub.attr in PATH_NAMES and isinstance(sub.value, ast.Name) and sub.value.id == "args":
            found.add(PATH_NAMES[sub.attr])
    return found


def scan(source: str, module: str) -> list[tuple[str, str, str]]:
    """(module:line, contract, what) for every read or naming of a contract that `module`
    (a repository-relative path) does not own."""
    tree = ast.parse(source)
    located = set()  # string constants that build a path or name a file in code
    for node in ast.walk(tree):
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
            located.update(id(c) for c in (node.left, node.right))
        elif isinstance(node, ast.Call) and _call_name(node) in PATH_BUILDERS:
            located.update(id(c) for c in node.args)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)) and node.value is not None:
            located.add(id(node.value))
    hits: dict[tuple[int, str], str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and _call_name(node) in RAW_READERS:
            target = list(node.args) + [k.value for k in node.keywords]
            if isinstance(node.func, ast.Attribute):  # path.read_text(): the path is the receiver
                target.append(node.func.value)
            for contract in set().union(*map(_contracts_in, target)) if target else set():
                hits[(node.lineno, contract)] = f"reads it with {_call_name(node)}()"
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) in located:
            for contract in _mentions(node.value):
                hits.setdefault((node.lineno, contract), "builds its path")
    return [
        (f"{module}:{line}", contract, what)
        for (line, contract), what in sorted(hits.items())
        if module not in CONTRACTS[contract][0]
    ]


def _sources() -> list[Path]:
    return sorted(p for d in ("pipeline", "stages") for p in (REPO / d).rglob("*.py"))


def test_every_owner_exists():
    for contract, (owners, _) in CONTRACTS.items():
        for owner in owners:
            assert (REPO / owner).is_file(), f"{contract}: owner {owner} does not exist; update CONTRACTS"


def test_contract_files_are_read_through_their_owner():
    seen_pending = set()
    problems = []
    for path in _sources():
        module = path.relative_to(REPO).as_posix()
        for where, contract, what in scan(path.read_text(), module):
            if (module, contract) in PENDING:
                seen_pending.add((module, contract))
                continue
            owners, reader = CONTRACTS[contract]
            problems.append(f"{where} {what} on {contract}, whose owner is {' / '.join(owners)}: call {reader}")
    assert not problems, "data contracts read outside their owner:\n" + "\n".join(problems)
    stale = sorted(set(PENDING) - seen_pending)
    assert not stale, f"PENDING entries that no longer match a read (remove them): {stale}"


# --------------------------------------------------------------------------- the scanner itself


PLANTED_VIOLATION = '''
"""A module that mentions labels.parquet in its docstring, which is allowed."""
import pandas as pd
import pyarrow.parquet as pq


def quanta_of(root):
    return pd.read_parquet(root / "labels.parquet")


def texts(tokens_path):
    return pq.read_table(tokens_path, columns=["token_str"])


def main(args):
    ap.add_argument("--clusters", default="cache/qdg/clusters.parquet", help="the cluster stage's clusters.parquet")
    return pd.read_parquet(args.clusters)


def meta(d):
    return (d / "_meta.json").read_text(), (d / "gradients_meta.json").read_text()


def check(d):
    if not d.exists():
        raise ValueError(f"{d} holds no quanta.parquet")  # a message may name the file
    return d.parent / "probe.parquet"
'''


def test_scanner_catches_a_planted_violation():
    hits = scan(PLANTED_VIOLATION, "pipeline/laws/example.py")
    found = {(where.split(":")[1], contract) for where, contract, _ in hits}
    assert found == {("8", "labels.parquet"), ("12", "tokens.parquet"), ("17", "clusters.parquet"),
                     ("21", "_meta.json"), ("27", "probe.parquet")}
    # the docstring, the CLI default and help text, the message and gradients_meta.json are not flagged
    assert {what for where, _, what in hits if not where.endswith(":27")} == {
        "reads it with read_parquet()", "reads it with read_table()", "reads it with read_text()"}


def test_scanner_lets_the_owner_read_and_flags_a_spelled_name():
    assert scan(PLANTED_VIOLATION, "pipeline/planted/suite.py") == [
        h for h in scan(PLANTED_VIOLATION, "pipeline/planted/suite.py") if h[1] != "labels.parquet"
    ]
    assert not [h for h in scan(PLANTED_VIOLATION, "pipeline/planted/suite.py") if h[1] == "labels.parquet"]
    spelled = scan('LABELS = "labels.parquet"\n', "stages/theory.py")
    assert spelled == [("stages/theory.py:1", "labels.parquet", "builds its path")]


@pytest.mark.parametrize("contract", sorted(CONTRACTS))
def test_each_contract_has_a_recognisable_name(contract):
    assert _mentions(f"cache/x/{contract}") == [contract]
