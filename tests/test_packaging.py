"""The distribution installs as documented, checked by real installs into fresh virtualenvs.

``pip install kombu-pyamqp-threadsafe`` gives the transport with kombu and amqp only;
``pip install 'kombu-pyamqp-threadsafe[dramatiq]'`` adds what ``dramatiq_kombu_broker`` needs,
and importing it without the extra raises an ImportError naming the extra. The wheel is built
from the sdist (``python -m build``), so the sdist is checked too. Dependencies come from the
package index through pip's cache: nothing of the test run's own environment leaks in.
"""

from __future__ import annotations

import email.parser
import json
import os
import subprocess
import sys
import tarfile
import venv
import zipfile
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

ROOT = Path(__file__).resolve().parent.parent
EXTRA_HINT = "pip install 'kombu-pyamqp-threadsafe[dramatiq]'"
#: What an sdist's tests need besides src/ and tests/ (they import, run or read these).
SDIST_NEEDS = ["stress/__init__.py", "stress/rabbit_admin.py", "examples/app.py",
               "docs/architecture.md", "scripts/ensure-rabbitmq", "typings/amqp/__init__.pyi",
               "Makefile", "LICENSE", "README.md", "pyproject.toml"]


def run(*args: str | Path, cwd: Path, timeout: float = 300) -> str:
    """Run a command outside this checkout's environment (no PYTHONPATH); return its stdout."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    proc = subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, (
        f"{' '.join(map(str, args))} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc.stdout


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    run(sys.executable, "-m", "build", "--outdir", out, ROOT, cwd=out)
    return out


def fresh_venv(path: Path) -> Path:
    """A virtualenv without pip (fast to make); the running pip installs into it."""
    venv.EnvBuilder(with_pip=False).create(path)
    return path / "bin" / "python"


def install(python: Path, requirement: str, cwd: Path) -> None:
    run(sys.executable, "-m", "pip", "--python", python, "install", "--quiet",
        "--disable-pip-version-check", requirement, cwd=cwd)


def distributions(python: Path, cwd: Path) -> set[str]:
    out = run(python, "-c", "import importlib.metadata as m, json; "
              "print(json.dumps(sorted(d.metadata['Name'].lower() for d in m.distributions())))",
              cwd=cwd)
    return set(json.loads(out))


def test_sdist_holds_what_its_tests_need_and_both_pass_twine_check(dist: Path) -> None:
    (sdist,) = dist.glob("*.tar.gz")
    with tarfile.open(sdist) as archive:
        names = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
    missing = [name for name in SDIST_NEEDS if name not in names]
    assert not missing, f"the sdist lacks {missing}"
    assert any(name.startswith("tests/test_") for name in names)
    run(sys.executable, "-m", "twine", "check", "--strict", *sorted(dist.iterdir()), cwd=dist)


def test_wheel_metadata_has_what_a_pypi_page_shows(dist: Path) -> None:
    """The licence, the links of the project's sidebar and its development status."""
    (wheel,) = dist.glob("*.whl")
    with zipfile.ZipFile(wheel) as archive:
        (name,) = [n for n in archive.namelist() if n.endswith(".dist-info/METADATA")]
        metadata = email.parser.Parser().parsestr(archive.read(name).decode())
    assert metadata["License-Expression"] == "BSD-3-Clause"
    urls = dict(url.split(", ", 1) for url in metadata.get_all("Project-URL", []))
    assert {"Homepage", "Source", "Issues", "Documentation"} <= set(urls), urls
    assert all(url.startswith("https://") for url in urls.values()), urls
    assert any(c.startswith("Development Status :: ") for c in metadata.get_all("Classifier", []))


def test_plain_install_has_the_transport_and_no_dramatiq(dist: Path, tmp_path: Path) -> None:
    (wheel,) = dist.glob("*.whl")
    python = fresh_venv(tmp_path / "venv")
    install(python, str(wheel), tmp_path)
    installed = distributions(python, tmp_path)
    assert {"kombu-pyamqp-threadsafe", "kombu", "amqp"} <= installed
    assert "dramatiq" not in installed, installed
    out = run(python, "-c", "import kombu_pyamqp_threadsafe as ts; print(ts.__file__); "
              "print(ts.KombuConnection('amqp://guest:guest@127.0.0.1:1//').transport_cls)",
              cwd=tmp_path)
    assert out.startswith(str(tmp_path)), out  # the installed copy, not this checkout
    proc = subprocess.run([str(python), "-c", "import dramatiq_kombu_broker"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60,
                          env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError:") and EXTRA_HINT in last, proc.stderr


def test_install_with_the_dramatiq_extra_has_the_broker(dist: Path, tmp_path: Path) -> None:
    (wheel,) = dist.glob("*.whl")
    python = fresh_venv(tmp_path / "venv")
    install(python, f"{wheel}[dramatiq]", tmp_path)
    assert {"kombu-pyamqp-threadsafe", "kombu", "amqp", "dramatiq"} <= distributions(
        python, tmp_path)
    # A broker connects on first use: constructing one needs no server.
    out = run(python, "-c", "import dramatiq, dramatiq_kombu_broker as b; "
              "print(b.__file__); "
              "print(isinstance(b.KombuBroker(url='amqp://guest:guest@127.0.0.1:1/'), "
              "dramatiq.Broker))", cwd=tmp_path)
    assert out.split() == [out.split()[0], "True"] and out.startswith(str(tmp_path)), out
