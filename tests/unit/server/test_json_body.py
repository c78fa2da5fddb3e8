"""A JSON body that is not UTF-8 or not JSON is a 400 ``invalid_request`` in our words, whatever msgspec says.

msgspec 0.23 words and classes an invalid-UTF-8 body differently from 0.22
(Litestar then answered ``http_error``); :func:`check_json_body` reads the body
first, so the answer no longer depends on the JSON library. The suite runs on
the locked msgspec; the last test reruns the hostile-input tests under the
other release that ``make venv`` keeps in ``.venv/compat``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import msgspec
import pytest

from appliance.identity.roles import Role
from appliance.server.context import json_body_problem
from tests.conftest import bearer

REPO = Path(__file__).resolve().parents[3]
#: msgspec releases the error mapping is tested under: the locked one, and this one (Makefile COMPAT_MSGSPEC).
COMPAT_MSGSPEC = "0.22.0"


@pytest.mark.parametrize(("body", "words"), [
    (b'{"name": "caf\xe9"}', "not valid UTF-8 (byte 14 is 0xe9)"),
    (b"\xff\xfe{}", "not valid UTF-8 (byte 1 is 0xff)"),
    (b'{"name": ', "not valid JSON: Expecting value at line 1 column 10"),
    (b'{"a": 1}\n{"b": 2}', "not valid JSON: Extra data at line 2 column 1"),
    (b'{"x": NaN}', "not valid JSON: NaN is not a JSON number"),
    (b"\xef\xbb\xbf{}", "not valid JSON: Unexpected UTF-8 BOM"),
    (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
])
def test_json_body_problem_names_the_problem(body, words):
    problem = json_body_problem(body)
    assert problem is not None and words in problem, problem


@pytest.mark.parametrize("body", [b"{}", b'{"name": "caf\xc3\xa9", "n": [1, 2.5, null, true]}', b'"\\u0000"'])
def test_valid_json_has_no_problem(body):
    assert json_body_problem(body) is None


@pytest.mark.parametrize(("body", "words"), [
    (b'{"name": "caf\xe9"}', "not valid UTF-8"),
    (b'{"name": "acme"', "not valid JSON"),
    (b"[" * 5000 + b"]" * 5000, "nested too deeply"),
])
@pytest.mark.parametrize("content_type", ["application/json", "application/merge-patch+json", None])
def test_api_answers_400_invalid_request(client, admin_token, body, words, content_type):
    headers = bearer(admin_token) | ({"Content-Type": content_type} if content_type else {})
    resp = client.post("/api/v1/projects", headers=headers, content=body)
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert (error["code"], error["type"], error["param"]) == ("invalid_request", "invalid_request_error", "body")
    assert words in error["message"]


def test_authentication_comes_before_the_body(client):
    """An anonymous caller learns nothing about body parsing: 401 first."""
    resp = client.post("/api/v1/projects", headers={"Content-Type": "application/json"}, content=b"\xff")
    assert resp.status_code == 401


def test_form_bodies_are_not_read_as_json(client, make_token):
    token = make_token("olivia", Role.DATA_OWNER, "acme")
    resp = client.post("/v1/files", headers=bearer(token), data={"purpose": "fine-tune"},
                       files={"file": ("t.jsonl", b'{"messages": [{"role": "user", "content": "hi"}, '
                                                  b'{"role": "assistant", "content": "hello"}]}\n')})
    assert resp.status_code == 201, resp.text


@pytest.mark.slow
def test_hostile_bodies_under_the_other_msgspec_release():
    """The hostile-input tests for bodies pass under msgspec 0.22 too (the suite runs on the locked release)."""
    compat = REPO / ".venv" / "compat" / f"msgspec-{COMPAT_MSGSPEC}"
    assert (compat / "msgspec").is_dir(), f"{compat} is missing: `make venv` installs it"
    assert msgspec.__version__ != COMPAT_MSGSPEC, "the lock pins the compat release: test another one"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(compat), os.environ.get("PYTHONPATH")]))}
    version = subprocess.run([sys.executable, "-c", "import msgspec; print(msgspec.__version__)"], env=env,
                             capture_output=True, text=True, check=True).stdout.strip()
    assert version == COMPAT_MSGSPEC
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "non_utf8 or nesting_bomb or nul_bytes "
         "or problem or invalid_request", "tests/security/test_hostile_input.py", "tests/unit/server/test_json_body.py",
         "--deselect", "tests/unit/server/test_json_body.py::test_hostile_bodies_under_the_other_msgspec_release"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert " passed" in run.stdout and "failed" not in run.stdout
