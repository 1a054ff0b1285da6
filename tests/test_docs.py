"""The documentation runs: README.md and docs/*.md are checked against the code.

* ``docs/cli.md`` is what ``zserve.cli_docs`` renders from the typer app, and
  ``docs/benchmarks.md`` what ``bench/docs_page.py`` renders from
  ``bench/results/*.json``: a stale page fails (``make docs`` rewrites both).
* Every relative link and image resolves, anchors included.
* Every ``python`` block compiles; every ``json`` block parses.
* Every ``zserve ...`` command line in a shell block names a real command and
  only options that command has; every ``make`` target exists.
* Every curl request in the docs is sent to a real gateway (a broker, an hf
  worker serving the tiny model as ``tiny``, ``zserve gateway``) and must be
  answered 200.
* docs/api.md names every request field the gateway's tables list
  (supported, no-op, or accepted at a neutral value).
* The README stays a short front door.
"""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.cli_lines import problems
from tests.conftest import FAST_HB
from tests.gateway.conftest import start_gateway
from zserve.launcher import Proc, start_broker, start_worker, wait_models

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```", re.S | re.M)
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def blocks(lang: str) -> Iterator[tuple[Path, str]]:
    for page in PAGES:
        for m in FENCE.finditer(page.read_text()):
            if m.group(1) == lang:
                yield page, m.group(2)


def shell_lines(text: str) -> Iterator[str]:
    """Logical lines of a shell block: continuations joined, comments cut."""
    joined = re.sub(r"\\\n\s*", " ", text)
    for line in joined.splitlines():
        try:
            words = shlex.split(line, comments=True)
        except ValueError:  # an unbalanced quote inside a comment, say
            words = shlex.split(line.split(" #", 1)[0])
        if words:
            yield shlex.join(words)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    s = re.sub(r"[`*]", "", heading.strip().lower())
    s = re.sub(r"[^\w\- ]", "", s)
    return s.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = FENCE.sub("", page.read_text())
    return {slug(m.group(1)) for m in re.finditer(r"^#+ (.+)$", text, re.M)}


# ------------------------------------------------------------------ generated


def test_cli_page_is_current() -> None:
    from zserve.cli_docs import render

    assert (ROOT / "docs" / "cli.md").read_text() == render(), (
        "docs/cli.md is stale: run `make docs`"
    )


def test_benchmarks_page_is_current() -> None:
    from bench.__main__ import load_results, rows_of
    from bench.docs_page import PAGE, render

    assert PAGE.read_text() == render(load_results(), rows_of), (
        "docs/benchmarks.md is stale: run `make docs`"
    )


def test_readme_is_short() -> None:
    n = len((ROOT / "README.md").read_text().splitlines())
    assert n <= 250, f"README.md has {n} lines; the rest belongs in docs/"


# ------------------------------------------------------------------ links


def test_relative_links_resolve() -> None:
    bad = []
    for page in PAGES:
        for target in LINK.findall(FENCE.sub("", page.read_text())):
            if re.match(r"[a-z]+:", target):
                continue  # http(s), mailto
            path, _, frag = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            if not dest.exists():
                bad.append(f"{page.name}: {target} (no such file)")
            elif frag and dest.suffix == ".md" and frag not in anchors(dest):
                bad.append(f"{page.name}: {target} (no such heading)")
    assert not bad, "\n".join(bad)


# ------------------------------------------------------------------ code blocks


def test_python_blocks_compile() -> None:
    n = 0
    for page, code in blocks("python"):
        compile(code, f"{page.name}:python", "exec")
        n += 1
    assert n >= 5


def test_json_blocks_parse() -> None:
    for page, code in blocks("json"):
        try:
            json.loads(code)
        except ValueError as e:
            raise AssertionError(f"{page.name}: a json block does not parse: {e}") from e


def test_zserve_command_lines_name_real_options() -> None:
    makefile = (ROOT / "Makefile").read_text()
    seen = 0
    bad = []
    for page, code in [*blocks("bash"), *blocks("sh")]:
        for line in shell_lines(code):
            words = shlex.split(line)
            while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):  # VAR=value cmd
                words = words[1:]
            if not words:
                continue
            if words[0] == "make" and len(words) > 1:
                if not re.search(rf"^{re.escape(words[1])}:", makefile, re.M):
                    bad.append(f"{page.name}: make {words[1]}: no such target")
                continue
            if Path(words[0]).name != "zserve" or len(words) < 2:
                continue
            seen += 1
            bad += [f"{page.name}: {p}" for p in problems(words[1:])]
    assert not bad, "\n".join(bad)
    assert seen >= 20


def test_api_page_names_every_field() -> None:
    from zserve.gateway import schema

    text = (ROOT / "docs" / "api.md").read_text()
    fields = schema.CHAT_FIELDS | schema.COMPLETION_FIELDS | schema.EMBEDDING_FIELDS
    fields |= schema.MESSAGE_FIELDS | set(schema.NOOP_FIELDS) | set(schema.NEUTRAL_VALUES)
    missing = sorted(f for f in fields if f"`{f}`" not in text)
    assert not missing, f"docs/api.md does not name: {missing}"


# ------------------------------------------------------------------ curl, for real


def curl_requests() -> list[tuple[str, str, dict]]:
    """(page, path, body) of every curl POST in the docs."""
    out = []
    for page, code in [*blocks("bash"), *blocks("sh")]:
        for line in shell_lines(code):
            words = shlex.split(line)
            if not words or words[0] != "curl" or "-d" not in words:
                continue
            url = next(w for w in words if w.startswith("http"))
            body = words[words.index("-d") + 1]
            out.append((page.name, httpx.URL(url).path, json.loads(body)))
    return out


@pytest.fixture(scope="module")
def gateway(tiny_model_dir: Path) -> Iterator[str]:
    procs: list[Proc] = []
    try:
        broker, frontend, backend = start_broker(*FAST_HB)
        procs.append(broker)
        procs.append(start_worker(
            backend, "--engine", "hf", "--model", str(tiny_model_dir), "--model-names", "tiny",
            *FAST_HB,
        ))  # fmt: skip
        wait_models(frontend, ["tiny"], 90)
        gw, root = start_gateway(frontend)
        procs.append(gw)
        yield root
    finally:
        for pr in reversed(procs):
            pr.stop()


def test_curl_requests_are_answered(gateway: str) -> None:
    reqs = curl_requests()
    assert len(reqs) >= 4
    with httpx.Client(base_url=gateway, timeout=30) as http:
        for page, path, body in reqs:
            r = http.post(path, json=body)
            assert r.status_code == 200, f"{page}: POST {path} {body}: {r.status_code} {r.text}"
            if body.get("stream"):
                assert r.text.rstrip().endswith("data: [DONE]")
