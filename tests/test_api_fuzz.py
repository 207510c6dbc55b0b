"""A seeded fuzz of every ``/ti/v1`` route: malformed JSON, wrong types, huge strings, path tricks, unknown
keys and odd path segments get a 4xx with a text ``detail`` (never a 500 or a traceback), and nothing is
written outside the embeddings and log folders (runs under pydantic 1 and 2: -m versioned).

Bodies start from each body's JSON schema (``GET /ti/v1/schema``) and are mutated; the generator is a
``random.Random`` seeded per route, so a failure names a body that the same seed makes again.
"""

from __future__ import annotations

import json
import os
import random
import re
import traceback
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import torch

from .test_api import make_service

pytestmark = pytest.mark.versioned
fastapi = pytest.importorskip("fastapi")

SEED = 20240611
#: bodies per POST route, segments per path-parameter route
BODIES = 300
SEGMENTS = 120
PREFIX = "/ti/v1"
ONE_MB = 1 << 20

NAN, INF = float("nan"), float("inf")
#: values of every JSON type, and numbers at the edges (NaN and Infinity go out as the raw tokens)
WRONG_TYPES: list[Any] = [
    None, True, False, 0, -1, 1.5, -0.0, 1e308, -1e308, NAN, INF, -INF, 2**63, 2**70, -(2**70), 10**400,
    "", "0", "1e3", "true", "null", "NaN", [], [1, "a"], [None], {}, {"name": "subject"}, [[[]]],
]  # fmt: skip
#: strings that try to leave a folder, name a device, or carry control, format and odd unicode characters
PATH_TRICKS = [
    "../../x", "../" * 40 + "etc/passwd", "/etc/passwd", "..\\..\\x", "C:\\x", "C:/x", "\\\\srv\\share\\x",
    "a/b", "a\\b", "..", ".", "...", "./x", "x/..", "\x00", "x\x00y", "\x01\x1b[31m\x7f", "\n", "x\r\ny",
    "\t", "~", "~/x", "~root", "$HOME", "${HOME}/x", "%2e%2e%2fx", "%00", "con", "NUL.txt", "com1", "aux.x",
    " x", "x ", "x.", ".x", '<>|?*:"', "é", "日本語の名前", "😀", "\u202ex", "\ufeffx", "\ud800", "x\udcff",
    "x" * 101, "x" * 300, "subject", "subject.safetensors", "subject/../subject", "[s]ubject", "[", "]",
    "{name}", "%s%n", "'; DROP TABLE x; --",
]  # fmt: skip
UNKNOWN_KEYS = [
    "foo", "", " name", "Name", "NAME", "__proto__", "constructor", "k" * 2000, "\x00", "é", "\ud800",
    "dataset", "learning_rate", "width", "height", "save_every", "expresion", "vector", "nearest ",
]  # fmt: skip
#: the merge language's alphabet: values, operators, functions and characters it does not know
EXPR_ATOMS = [
    "'cat'", "'subject'", "'nan'", "'a dog'", "''", "'''", "'", "'x''y'", "'subject,cat'", "'\x00'", "'😀'",
    "0", "1", "2", "0.5", ".5", "1e308", "1e-308", "1e999", "3L", "0.5G", "2 L", "00", "000", "0000", "49407",
    "49408", "75", "76", "4096", "4097", "1.5.2", "2x", "avg", "mean", "lerp", "norm", "pool", "L", "G",
    "foo", "__import__", "x_y", "e",
]  # fmt: skip
EXPR_OPS = [
    "+", "-", "*", "/", "^", ":", ":+", ":-", "=*", "=/", "=:", "=", ",", "(", ")", "[", "]", "**", " ", '"',
    "\\", "#", "\x00", "é", ";", "\n",
]  # fmt: skip
FUNCTIONS = ["avg", "mean", "lerp", "norm", "pool", "L", "G", "foo"]
CONTENT_TYPES = [
    "application/json", "application/json; charset=utf-8", "text/plain", "",
    "application/x-www-form-urlencoded", "multipart/form-data; boundary=x",
]  # fmt: skip
#: folders whose scan walks the whole file system (/proc links to /): a train body with one of them and an
#: existing embedding makes the request scan it before answering, and then train on every image found
BROAD = {"", "/proc", "/tmp"}
#: a crash inside a job is stored as "TypeError: ..." (JobManager); our errors are sentences
CRASH = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt)\b:")


@dataclass
class Spec:
    types: set[str]
    enum: list[Any]
    required: bool


def field_specs(schema: dict[str, Any]) -> dict[str, Spec]:
    """A body's fields with their JSON types and allowed values (pydantic 1 and 2 write these differently)."""
    defs = {**schema.get("definitions", {}), **schema.get("$defs", {})}
    out: dict[str, Spec] = {}
    for name, prop in schema["properties"].items():
        types: set[str] = set()
        enum: list[Any] = []
        stack = [prop]
        while stack:
            p = stack.pop()
            if "$ref" in p:
                stack.append(defs[p["$ref"].rsplit("/", 1)[-1]])
            for key in ("anyOf", "oneOf", "allOf"):
                stack.extend(p.get(key, []))
            t = p.get("type")
            types.update([t] if isinstance(t, str) else t or [])
            enum.extend(p.get("enum", []))
            if "const" in p:
                enum.append(p["const"])
        out[name] = Spec(types, enum, name in schema.get("required", []))
    return out


@dataclass
class Case:
    """One request: what it tests, the method, the URL and the raw body."""

    kind: str
    method: str
    url: str
    body: bytes | None = None
    headers: dict[str, str] = field(default_factory=dict)

    def describe(self) -> str:
        body = (
            ""
            if self.body is None
            else repr(self.body[:300]) + (f"... ({len(self.body)} bytes)" if len(self.body) > 300 else "")
        )
        return f"[{self.kind}] {self.method} {self.url[:200]!r} {body}"


class Fuzzer:
    """Bodies and path segments for one route, from a seeded generator."""

    def __init__(self, rng: random.Random, specs: dict[str, Spec], data: Path, folders: list[Path]) -> None:
        self.rng = rng
        self.specs = specs
        self.data = data
        self.folders = folders
        #: every string sent as a name or a folder (what a wrong write would be called)
        self.used: set[str] = set()
        self.fresh = 0

    # ------------------------------------------------------------------ values
    def text(self, n: int | None = None) -> str:
        n = self.rng.randint(0, 40) if n is None else n
        alphabet = self.rng.choice([
            "abcdefghijklmnopqrstuvwxyz ", "abc'\"\\/.:,()[]{}<>|*?$%~", "\x00\x01\x1f\x7f\n\r\t ",
            "éü日本語😀\u202e\ufeff",
        ])  # fmt: skip
        return "".join(self.rng.choice(alphabet) for _ in range(n))

    def huge(self) -> str:
        n = self.rng.choice([10_001, 20_000, 50_000, 200_000])
        unit = self.rng.choice(["a", "../", "é", "😀", "[name] ", "'cat'+", "(", "\x00", " "])
        return (unit * (n // len(unit) + 1))[:n]

    def name(self) -> str:
        r = self.rng.random()
        if r < 0.3:
            name = self.rng.choice(["subject", "subject", "subject", "nan"])
        elif r < 0.55:
            self.fresh += 1
            name = f"fz{self.rng.randrange(10**6)}"
        elif r < 0.85:
            name = self.rng.choice(PATH_TRICKS)
        else:
            name = self.text()
        self.used.add(name)
        return name

    def expression(self) -> str:
        r = self.rng.random()
        if r < 0.35:
            return self.grammar(self.rng.randint(0, 4))
        if r < 0.75:
            return "".join(self.rng.choice(EXPR_ATOMS + EXPR_OPS) for _ in range(self.rng.randint(0, 30)))
        n = self.rng.choice([10, 100, 200, 300, 500, 1000, 2000, 3000])
        x = self.rng.choice(["'cat'", "1", "'subject'"])
        return self.rng.choice([
            "(" * n + x + ")" * n, "(" * n + x, x + ")" * n, "[" * n + x + "]" * n, "-" * n + x, "- " * n + x,
            "2^" * n + "2", "'a'+" * n + "'a'", x + "[0]" * n, x + ":1" * n, "avg(" * n + x + ")" * n,
            "norm(" * n + x + ")" * n, x + "*1" * n, x + ",1" * n, "'" * n, "(" * n,
        ])[: self.rng.choice([9_999, 10_000, 10_001, 100_000])]  # fmt: skip

    def grammar(self, depth: int) -> str:
        """A mostly well-formed expression (so that some reach the evaluator)."""
        rng = self.rng
        if depth <= 0:
            return rng.choice(
                ["'cat'", "'subject'", "'a dog'", "1", "0.5", "2", "'cat',49407", "00", "-1", "1e308"]
            )
        a, b = self.grammar(depth - 1), self.grammar(depth - 1)
        return rng.choice([
            f"{a} {rng.choice('+-*/^')} {b}", f"({a})", f"-{a}", f"{a}[{rng.randint(-3, 3)}]",
            f"{a}[1:{rng.randint(-2, 80)}]", f"{a}:{rng.choice([0, 1, 3, 75, 76, 4096, 5000, -1])}",
            f"{a}:+{rng.randint(-5, 5)}", f"{a} =* {b}", f"{rng.choice(FUNCTIONS)}({a}, {b})",
            f"lerp({a}, {b}, {rng.random():.2f})", f"pool({a}, {rng.choice([0, 1, 4, 10**6])})", f"norm({a})",
            f"{a}, {b}",
        ])  # fmt: skip

    def folder(self) -> str:
        r = self.rng.random()
        if r < 0.12:
            value = str(self.data)
        elif r < 0.3:
            value = self.rng.choice([
                str(self.data / "0.png"), str(self.data / "missing"), "/nonexistent/x", "/", "/etc", "/proc",
                "/tmp", ".", "", " ", "~", "$HOME", str(self.data) + "/", str(self.data) + "/../data",
                str(self.data) + "\x00",
                "a" * 300, "/" + "b" * 5000, "/".join(["c" * 200] * 30), *map(str, self.folders),
            ])  # fmt: skip
        else:
            value = self.rng.choice(PATH_TRICKS)
        self.used.add(value)
        return value

    def valid(self, name: str, spec: Spec) -> Any:
        """A value of the field's type that is often also a good value."""
        rng = self.rng
        if spec.enum:
            return rng.choice(spec.enum)
        if name in ("name", "embedding"):
            return self.name()
        if name == "expression":
            return self.expression()
        if name == "dataset_dir":
            return self.folder()
        if name == "template":
            return rng.choice([
                "subject", "subject_filewords", "style", "a photo of [name]", "[name]\n[name], [filewords]",
                "[name] " * 60, "a photo of [name] " + "x" * 300, str(self.data / "0.png"), "/etc/hostname",
                "/etc/passwd", "/nonexistent.txt", str(self.data), "", "nonexistent_template", self.text(),
            ])  # fmt: skip
        if name == "lr":
            return rng.choice([
                "5e-3", 1e-3, 0.005, "1e-3:1, 1e-4", "0.005:2, 1e-3", "0", "-1", "nan", "inf", "1e999",
                "1:2:3", "a", "", ",", "5e-3:" + "9" * 5000, self.text(),
            ])  # fmt: skip
        if name == "init_text":
            return rng.choice(["*", "a cat", "", " ", self.text()])
        if "boolean" in spec.types:
            return rng.random() < 0.5
        if "integer" in spec.types:
            low, high = {"steps": (1, 3), "vectors": (1, 4), "nearest": (0, 8), "resolution": (64, 128),
                         "batch_size": (1, 2), "grad_accum": (1, 2), "repeats": (1, 2), "seed": (0, 10**6),
                         "warmup_steps": (0, 1)}.get(name, (0, 3))  # fmt: skip
            value = rng.randint(low, high)
            return value - value % 64 if name == "resolution" else value
        if "number" in spec.types:
            return round(rng.uniform(0.0, 0.5), 3)
        if "string" in spec.types:
            return self.text()
        return None

    def body(self, fields: list[str] | None = None) -> dict[str, Any]:
        """A plausible body: the required fields and a few optional ones."""
        names = [
            n
            for n, s in self.specs.items()
            if s.required or self.rng.random() < (0.9 if n == "dataset_dir" else 0.3)
        ]
        return {n: self.valid(n, self.specs[n]) for n in (fields or names)}

    # ------------------------------------------------------------------ bodies
    def bodies(self, route: str, count: int) -> Iterator[tuple[str, bytes]]:
        """(kind, raw body) pairs; one kind of mutation per body, or a few at once."""
        mutations: list[tuple[str, float, Callable[[], Any]]] = [
            ("valid", 3.0, self.body),
            ("wrong type", 3.0, self.wrong_type),
            ("huge string", 1.0, self.huge_string),
            ("path trick", 2.0, self.path_trick),
            ("unknown key", 1.5, self.unknown_key),
            ("missing key", 1.0, self.missing_key),
            ("mixed", 2.0, self.mixed),
        ]
        if route in ("merge", "evaluate"):
            mutations.append(("expression", 4.0, lambda: {**self.body(), "expression": self.expression()}))
        if route == "train":
            mutations.append(("aliases", 1.5, self.aliases))
            mutations.append(("dataset", 1.5, lambda: {**self.body(), "dataset_dir": self.folder()}))
        raw_kinds: list[tuple[str, float, Callable[[], bytes]]] = [
            ("non-object", 1.0, self.non_object),
            ("malformed", 1.5, self.malformed),
            ("big body", 0.4, self.big_body),
            ("big number", 0.5, self.big_number),
            ("deep value", 0.5, self.deep_value),
        ]
        weights = [w for _, w, _ in mutations] + [w for _, w, _ in raw_kinds]
        for _ in range(count):
            i = self.rng.choices(range(len(weights)), weights)[0]
            if i < len(mutations):
                kind, _, make = mutations[i]
                yield kind, self.encode(self.guard(make()))
            else:
                kind, _, make_raw = raw_kinds[i - len(mutations)]
                yield kind, make_raw()

    @staticmethod
    def guard(body: dict[str, Any]) -> dict[str, Any]:
        """A body that would scan a whole file system names an embedding that does not exist, so it
        fails before the scan (the check walks the folder in the request; see BROAD)."""
        folders = {str(body.get(k)).strip().rstrip("/") for k in ("dataset_dir", "dataset")}
        if folders & BROAD and body.get("embedding") == "subject":
            body["embedding"] = "fz_absent"
        return body

    def encode(self, body: Any) -> bytes:
        r = self.rng.random()
        if r < 0.8:  # ASCII with \u escapes (lone surrogates come through as such); NaN and Infinity raw
            return json.dumps(body, allow_nan=True).encode()
        if r < 0.95:
            return json.dumps(
                body, allow_nan=True, ensure_ascii=False, indent=self.rng.choice([None, 2])
            ).encode("utf-8", "surrogatepass")
        return json.dumps(body, allow_nan=True).encode("utf-16")

    def wrong_type(self) -> dict[str, Any]:
        body = self.body()
        for name in self.rng.sample(list(self.specs), self.rng.randint(1, min(3, len(self.specs)))):
            body[name] = self.rng.choice(WRONG_TYPES)
        return body

    def string_fields(self) -> list[str]:
        return [n for n, s in self.specs.items() if "string" in s.types and not s.enum] or list(self.specs)

    def huge_string(self) -> dict[str, Any]:
        body = self.body()
        body[self.rng.choice(list(self.specs) if self.rng.random() < 0.3 else self.string_fields())] = (
            self.huge()
        )
        return body

    def path_trick(self) -> dict[str, Any]:
        body = self.body()
        for name in self.rng.sample(self.string_fields(), self.rng.randint(1, len(self.string_fields()))):
            body[name] = self.rng.choice(PATH_TRICKS)
            self.used.add(body[name])
        return body

    def unknown_key(self) -> dict[str, Any]:
        body = self.body()
        for _ in range(self.rng.randint(1, 3)):
            body[self.rng.choice(UNKNOWN_KEYS)] = self.rng.choice(
                [*WRONG_TYPES, "subject", str(self.data), 64]
            )
        return body

    def missing_key(self) -> dict[str, Any]:
        body = self.body()
        for name in [n for n, s in self.specs.items() if s.required]:
            if self.rng.random() < 0.7:
                body.pop(name, None)
        return body

    def deep_value(self) -> bytes:
        """A field whose value nests lists and objects about as deep as the parser allows, and deeper."""
        body = self.body()
        key = self.rng.choice(list(self.specs))
        body[key] = "__deep__"
        depth = self.rng.choice([100, 500, 900, 950, 980, 990, 995, 1000, 1200, 5000])
        opens = [self.rng.choice(["[", '{"a":']) for _ in range(depth)]
        closes = "".join("]" if o == "[" else "}" for o in reversed(opens))
        value = "".join(opens) + self.rng.choice(['"x"', "1", "null"]) + closes
        return json.dumps(body).replace('"__deep__"', value, 1).encode()

    def mixed(self) -> dict[str, Any]:
        body = self.body(list(self.specs))
        for name in list(body):
            r = self.rng.random()
            if r < 0.2:
                body[name] = self.rng.choice(WRONG_TYPES)
            elif r < 0.35 and isinstance(body[name], str):
                body[name] = self.rng.choice(PATH_TRICKS)
                self.used.add(body[name])
            elif r < 0.4:
                del body[name]
        return body

    def aliases(self) -> dict[str, Any]:
        body = self.body()
        rng = self.rng
        if rng.random() < 0.5:
            body["dataset"] = rng.choice([body.get("dataset_dir"), str(self.data), self.folder()])
        if rng.random() < 0.4:
            body["learning_rate"] = rng.choice([body.get("lr"), "1e-3", 0.002, NAN, -1, [], None])
        if rng.random() < 0.3:
            body["save_every"] = rng.choice([1, 7, -1, 2**70, "x", None])
        if rng.random() < 0.6:
            edge = [
                64,
                512,
                63,
                0,
                -64,
                1e308,
                INF,
                -INF,
                NAN,
                10**200,
                2**70,
                "512",
                "x",
                None,
                True,
                [64],
                64.5,
            ]
            for key in rng.sample(["width", "height"], rng.randint(1, 2)):
                body[key] = rng.choice(edge)
        if rng.random() < 0.2:
            body["resolution"] = rng.choice([64, 128, 10**9, 2**70, 0, -64])
        return body

    def non_object(self) -> bytes:
        value = self.rng.choice(
            [[], [self.body()], 1, -1.5, "subject", None, True, 10**400, NAN, INF, [[[[]]]]]
        )
        return json.dumps(value, allow_nan=True).encode()

    def malformed(self) -> bytes:
        good = json.dumps(self.body()).encode()
        n = self.rng.choice([1_000, 100_000, 500_000])
        return self.rng.choice([
            b"", b" ", b"\n\t ", b"{", b"}", b"[", b'{"name":', b'{"name": "x",}', b"{'name': 'x'}", b"\x00",
            b"\xff\xfe\xfd", b"\xc3\x28", b'{"name": "\xff"}', b'{"name": "\xed\xa0\x80"}',
            good[: len(good) // 2], good + b"x", good + good, b"\xef\xbb\xbf" + good, b"NaN", b"-Infinity",
            b"undefined", b"nul",
            b"[" * n, b"{" * n, b'{"a":' * n, b"[" * 100_000 + b"]" * 100_000, b'"' + b"\\" * 1001 + b'"',
            b'{"name": "\\ud800\\udc00\\udfff"}', b'{"name": "\\u00"}', b"1" * 5000, b"0x10", b"01", b"1e400",
        ])  # fmt: skip

    def big_body(self) -> bytes:
        """Bodies a little under and over the limit (the string in them is over the text limit)."""
        target = ONE_MB + self.rng.choice([-200, -1, 0, 1, 10_000, 4 * ONE_MB])
        body = self.body()
        key = self.rng.choice(self.string_fields())
        body[key] = ""
        empty = len(json.dumps(body).encode())
        body[key] = "a" * max(0, target - empty)
        return json.dumps(body).encode()

    def big_number(self) -> bytes:
        body = self.body()
        key = self.rng.choice(list(self.specs))
        body[key] = 0
        number = self.rng.choice([
            "9" * 4300, "9" * 4301, "1" * 50_000, "-" + "9" * 10_000, "1e400", "-1e400", "1e-400",
            "1." + "0" * 10_000 + "1", "123456789012345678901234567890",
        ])  # fmt: skip
        return json.dumps(body).replace(f'"{key}": 0', f'"{key}": {number}', 1).encode()

    # ------------------------------------------------------------------ path segments
    def segment(self) -> str:
        """A path segment for ``{name}`` or ``{job_id}``: encoded, raw and broken percent escapes."""
        rng = self.rng
        r = rng.random()
        if r < 0.4:
            value = rng.choice(PATH_TRICKS)
            self.used.add(value)
            return quote(value.encode("utf-8", "surrogatepass"), safe="")
        if r < 0.8:
            return rng.choice([
                "..%2F..", "..%2f..%2fetc%2fpasswd", "%2e%2e", "%2e%2e%2f%2e%2e", "..", ".", "%00", "a%00b",
                "%0a", "%ff", "%ed%a0%80", "%", "%zz", "%2", "x" * 5000, "y" * 50_000, "subject",
                "subject%20", "%20",
                "subject.safetensors", "subject?nearest=1000", "subject#x", "subject;x", "~", "%7e", "$HOME",
                "train-1-0", "train-0", "-1", "0", "1e308", "null", "%5Bs%5Dubject", "C:%5Cx", "%5C..%5C..",
            ])  # fmt: skip
        return quote(self.text().encode("utf-8", "surrogatepass"), safe="")


# ---------------------------------------------------------------------- the run


@dataclass
class Run:
    client: Any
    service: Any
    root: Path
    data: Path
    failures: list[str] = field(default_factory=list)
    #: how many answers had each status
    statuses: Counter[int] = field(default_factory=Counter)

    def send(self, case: Case) -> Any:
        r = self.client.request(case.method, case.url, content=case.body, headers=case.headers)
        self.statuses[r.status_code] += 1
        self.check(r, case)
        if r.status_code == 202 and case.url.endswith("/train"):
            self.stop(r.json()["job"], case)
        return r

    def check(self, r: Any, case: Case) -> None:
        def fail(what: str) -> None:
            self.failures.append(f"{case.describe()}\n    -> {r.status_code}: {what}")

        if r.status_code >= 500:
            fail(r.text[:500])
            return
        try:
            out = r.json()
        except ValueError:
            fail(f"the answer is not JSON: {r.text[:200]!r}")
            return
        if r.status_code >= 400:
            detail = out.get("detail") if isinstance(out, dict) else None
            if not isinstance(detail, str) or not detail.strip():
                fail(f"no text detail: {r.text[:200]!r}")
            elif "Traceback" in detail or 'File "' in detail:
                fail(f"a traceback in the detail: {detail[:300]!r}")

    def stop(self, job_id: str, case: Case) -> None:
        """A valid /train started a job: stop it, wait for it, and check how it ended."""
        self.send(Case("stop", "POST", f"{PREFIX}/jobs/{quote(job_id, safe='')}/stop"))
        job = self.service.jobs.get(job_id)
        if job.thread is not None:
            job.thread.join(timeout=120)
            assert not job.thread.is_alive(), f"job {job_id} did not stop"
        status = self.send(Case("job status", "GET", f"{PREFIX}/jobs/{quote(job_id, safe='')}"))
        if status.status_code == 200:
            message = status.json().get("error") or ""
            if CRASH.match(message):
                self.failures.append(f"{case.describe()}\n    -> the job crashed: {message[:500]}")


def _listing(folder: Path) -> set[str]:
    try:
        return {p.name for p in folder.iterdir()}
    except OSError:
        return set()


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def fuzz_run(tmp_path, monkeypatch):
    """The service with every folder inside ``tmp_path/root``, and an empty working directory."""
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from lib_ti.ui.api import add_routes

    root, cwd = tmp_path / "root", tmp_path / "cwd"
    root.mkdir()
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    service, data = make_service(root, "sd1")
    # files the listing and the readers must also answer for: a name in another encoding, and vectors
    # that are not finite
    emb = Path(service.host.embeddings_dir())
    (emb / os.fsdecode(b"odd\xff.safetensors")).write_bytes(b"not an embedding")
    from safetensors.torch import save_file

    save_file({"emb_params": torch.full((2, 768), float("nan"))}, str(emb / "nan.safetensors"))
    app = FastAPI()
    add_routes(app, service)
    app.add_exception_handler(Exception, _server_error)
    return Run(TestClient(app, raise_server_exceptions=False), service, root, data)


def _server_error(request: Any, exc: Exception) -> Any:
    """A 500 that says what was raised and where (the failure list shows it)."""
    from fastapi.responses import PlainTextResponse

    where = traceback.extract_tb(exc.__traceback__)[-3:]
    text = "".join(traceback.format_exception_only(exc)).strip()[:400]
    frames = "; ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in where)
    return PlainTextResponse(f"{text} [{frames}]", status_code=500)


def _watched() -> list[Path]:
    """Folders where a path trick could land a file: the repository, /tmp, the home folder, / and /etc."""
    return [Path(__file__).resolve().parents[1], Path("/tmp"), Path.home(), Path("/"), Path("/etc")]


def _leaked(before: dict[Path, set[str]], used: set[str]) -> list[str]:
    """New entries in the watched folders that carry a name the fuzzer sent (as a whole or with a suffix)."""
    stems = {Path(s.replace("\\", "/")).name for s in used if "\x00" not in s} - {""}
    found = []
    for folder, names in before.items():
        for entry in _listing(folder) - names:
            if any(entry == s or entry.startswith(s + ".") for s in stems):
                found.append(str(folder / entry))
    return found


def _check_folders(
    run: Run, fuzzer: Fuzzer, data_before: dict[str, bytes], watched: dict[Path, set[str]]
) -> None:
    emb, logs = Path(run.service.host.embeddings_dir()), Path(run.service.host.log_dir())
    outside = [str(p) for p in run.root.rglob("*") if p.is_file() and not any(
        p.is_relative_to(f) for f in (emb, logs, run.data))]  # fmt: skip
    assert outside == [], f"files written outside the embeddings and log folders: {outside[:20]}"
    assert _snapshot(run.data) == data_before, "the dataset folder changed"
    assert list(Path.cwd().iterdir()) == [], "files written into the working directory"
    leaked = _leaked(watched, fuzzer.used)
    assert leaked == [], f"files with names the fuzzer sent appeared: {leaked}"


def _report(run: Run) -> None:
    if run.failures:
        shown = "\n".join(run.failures[:25])
        pytest.fail(f"{len(run.failures)} request(s) failed:\n{shown}", pytrace=False)


BODY_ROUTES = ["inspect", "create", "merge", "evaluate", "train"]


@pytest.mark.parametrize("route", BODY_ROUTES)
def test_body_routes_answer_every_body_with_2xx_or_4xx(fuzz_run, route):
    run = fuzz_run
    schema = run.client.get(f"{PREFIX}/schema").json()["bodies"][route]
    rng = random.Random(f"{SEED}:{route}")
    fuzzer = Fuzzer(rng, field_specs(schema), run.data, [Path(run.service.host.embeddings_dir())])
    data_before, watched = _snapshot(run.data), {f: _listing(f) for f in _watched()}
    for kind, raw in fuzzer.bodies(route, BODIES):
        headers = {"content-type": ct} if (ct := rng.choice(CONTENT_TYPES)) else {}
        run.send(Case(kind, "POST", f"{PREFIX}/{route}", raw, headers))
    # the listing still reads whatever the fuzz wrote
    run.send(Case("listing", "GET", f"{PREFIX}/embeddings"))
    _report(run)
    _check_folders(run, fuzzer, data_before, watched)
    # the generator reaches the work behind the checks too (a valid train body starts a job: 202). Two:
    # the seeded bodies on the test's own dataset; a third came from training on whatever images /tmp held
    # while it had fewer than the folder limit's files, which depends on the machine
    assert run.statuses[202 if route == "train" else 200] >= 2, run.statuses


def test_path_parameters_and_other_routes(fuzz_run):
    run = fuzz_run
    rng = random.Random(f"{SEED}:paths")
    fuzzer = Fuzzer(rng, {}, run.data, [])
    data_before, watched = _snapshot(run.data), {f: _listing(f) for f in _watched()}
    # a real job to point at (a valid body, stopped at once)
    r = run.send(Case("valid", "POST", f"{PREFIX}/train", json.dumps(
        {"embedding": "subject", "dataset_dir": str(run.data), "steps": 2, "resolution": 64,
         "validation_every": 0}).encode()))  # fmt: skip
    assert r.status_code == 202, r.text
    real = r.json()["job"]
    for _ in range(SEGMENTS):
        seg = fuzzer.segment()
        query = rng.choice(["", "", "?nearest=100000", "?name=../../x", "?a=%00", "?" + "q" * 5000])
        for method, url in (
            ("GET", f"{PREFIX}/inspect/{seg}"),
            ("GET", f"{PREFIX}/jobs/{seg}"),
            ("POST", f"{PREFIX}/jobs/{seg}/stop"),
            ("GET", f"{PREFIX}/jobs/{real}{rng.choice(['', '/', '/stop/'])}"),
        ):
            run.send(Case("segment", method, url + query))
    for _ in range(20):
        query = "?" + quote(fuzzer.text(), safe="=&")
        for path in ("/schema", "/embeddings", f"/jobs/{real}", "/inspect/subject"):
            run.send(Case("query", "GET", PREFIX + path + query))
    # methods the routes do not take, and bodies where none is read
    paths = ["/schema", "/embeddings", "/inspect/subject", "/inspect", "/create", "/train", f"/jobs/{real}",
             f"/jobs/{real}/stop", "/nothing"]  # fmt: skip
    for path in paths:
        for method in ("GET", "POST", "PUT", "DELETE", "PATCH"):
            run.send(Case("method", method, PREFIX + path, b'{"name": "../x"}'))
    assert run.client.get(f"{PREFIX}/inspect/subject").status_code == 200
    _report(run)
    _check_folders(run, fuzzer, data_before, watched)


def test_a_long_inline_template_line_is_not_a_500(fuzz_run):
    run = fuzz_run
    body = {"embedding": "subject", "dataset_dir": str(run.data), "template": "a photo of [name], " + "x" * 300,
            "steps": 2, "resolution": 64, "validation_every": 0}  # fmt: skip
    r = run.send(Case("template", "POST", f"{PREFIX}/train", json.dumps(body).encode()))
    assert r.status_code == 202, r.text
