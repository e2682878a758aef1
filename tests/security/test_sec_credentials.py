"""Attack: credentials echoed (issue 20, low).

On the code before this fix, a tracking URI with ``user:password@`` was echoed in CLI errors and
log lines (and in ``daybreak serve``'s ``/health``, tested in test_sec_server.py). Here the real
CLI talks to a registry that does not answer, and every line it prints is searched.
"""

from __future__ import annotations

import os
import subprocess

from conftest import BIN, SPEC, free_port

from daybreak.infra.errors import redact

SECRET = "hunter2-not-for-logs"


def test_redact_strips_userinfo_from_every_uri() -> None:
    text = (f"failed: https://bob:{SECRET}@mlflow.example:5000/api/2.0 and "
            f"postgresql+psycopg://svc:{SECRET}@db/mlflow; plain http://mlflow:5000 stays")
    out = redact(text)
    assert SECRET not in out and "bob" not in out
    assert "https://***@mlflow.example:5000/api/2.0" in out and "http://mlflow:5000 stays" in out
    # a raw '@' in the password: URL parsers take the last '@' as the end of the user info
    assert redact(f"http://bob:p@{SECRET}@host:5000/x") == "http://***@host:5000/x"


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", MLFLOW_HTTP_REQUEST_TIMEOUT="5",
               DAYBREAK_DEBUG="1")  # debug logging too: nothing it prints may carry the password
    return subprocess.run([str(BIN / "daybreak"), *args], capture_output=True, text=True, timeout=180, env=env)


def test_cli_errors_and_logs_never_carry_the_password(tmp_path) -> None:
    uri = f"http://bob:{SECRET}@127.0.0.1:{free_port()}"  # nothing listens there
    for args in (["versions", "--spec", str(SPEC), "--tracking-uri", uri],
                 ["rollback", "--spec", str(SPEC), "--reason", "test", "--tracking-uri", uri]):
        out = _cli(*args)
        assert out.returncode != 0, out
        printed = out.stdout + out.stderr
        assert SECRET not in printed, f"daybreak {args[0]} printed the password:\n{printed[-2000:]}"
        assert "127.0.0.1" in printed  # the error still says where it failed


LOGS = f"""
import logging
from daybreak.cli import setup_logging
setup_logging()
logging.getLogger("daybreak.test").warning("could not reach %s", "https://bob:{SECRET}@mlflow:5000")
try:
    raise RuntimeError("request to https://bob:{SECRET}@mlflow:5000 failed")
except RuntimeError:
    logging.getLogger("mlflow.test").exception("registry call failed")
"""


def test_log_records_are_redacted_by_the_cli_handler() -> None:
    """What the CLI's log handler prints: daybreak's records and other libraries', tracebacks too."""
    out = subprocess.run([str(BIN / "python"), "-c", LOGS], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert SECRET not in out.stderr, out.stderr
    assert out.stderr.count("https://***@mlflow:5000") == 2, out.stderr
