"""Entry points come from a per-user cache while no ``sys.path`` directory changed, and the cache never lies.

Each test runs real interpreters against a real installed distribution (a
``.dist-info`` in a directory on ``sys.path``) and a cache directory of its own.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from tests.core.conftest import make_distribution, run_python

PLUGIN = """
import kservice

@kservice.hookimpl
def kservice_known_services():
    return ["{name}-service"]
"""

#: Prints the plugins loaded, and whether importlib.metadata was imported to find them.
PROBE = """
import json, sys
from kservice import ServiceManager
from kservice._plugins import get_plugin_manager
ServiceManager()
names = sorted(name for name, plugin in get_plugin_manager().list_name_plugin() if plugin is not None)
print(json.dumps({"plugins": names, "metadata_imported": "importlib.metadata" in sys.modules}))
"""


def _age(directory: Path, seconds: float = 60.0) -> None:
    """Make ``directory`` look modified ``seconds`` ago (older than the racy window), as an install long done."""
    then = time.time() - seconds
    os.utime(directory, (then, then))


def _probe(site: Path, cache: Path | str, cwd: Path | None = None) -> dict[str, object]:
    done = run_python(PROBE, site=site, env={"KSERVICE_CACHE_DIR": str(cache)}, cwd=cwd)
    assert done.returncode == 0, done.stderr
    result: dict[str, object] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def _site_with(tmp_path: Path, *names: str) -> Path:
    site = tmp_path / "site"
    for name in names:
        site = make_distribution(
            tmp_path, f"acme_{name}", {"kservice": {name: f"acme_{name}"}}, {f"acme_{name}": PLUGIN.format(name=name)}
        )
    return site


@pytest.mark.timeout(120)
def test_a_warm_start_reads_no_metadata_and_finds_the_same_plugins(tmp_path: Path) -> None:
    site = _site_with(tmp_path, "alpha")
    _age(site)
    cache = tmp_path / "cache"
    cold = _probe(site, cache)
    assert "alpha" in cold["plugins"] and "mmap" in cold["plugins"]  # type: ignore[operator]
    assert cold["metadata_imported"] is True  # the first start reads the metadata and writes the cache
    assert list(cache.glob("entry-points-*.json"))
    warm = _probe(site, cache)
    assert warm["plugins"] == cold["plugins"]
    assert warm["metadata_imported"] is False


@pytest.mark.timeout(120)
def test_a_warm_start_from_another_working_directory_reads_and_rewrites_nothing(tmp_path: Path) -> None:
    """The working directory (``""`` on sys.path) is cached as the directory it is, not as one shared entry."""
    site = _site_with(tmp_path, "alpha")
    here, there = tmp_path / "here", tmp_path / "there"
    for directory in (here, there):
        directory.mkdir()
        _age(directory)
    _age(site)
    cache = tmp_path / "cache"
    for directory in (here, there):  # each becomes known
        assert "alpha" in _probe(site, cache, cwd=directory)["plugins"]  # type: ignore[operator]
    (cache_file,) = cache.glob("entry-points-*.json")
    written = cache_file.stat()
    for directory in (here, there, here):
        probed = _probe(site, cache, cwd=directory)
        assert "alpha" in probed["plugins"] and probed["metadata_imported"] is False  # type: ignore[operator]
    now = cache_file.stat()
    assert (now.st_ino, now.st_mtime_ns) == (written.st_ino, written.st_mtime_ns), "the cache was rewritten"


@pytest.mark.timeout(120)
def test_installing_and_removing_a_distribution_is_seen_at_the_next_start(tmp_path: Path) -> None:
    site = _site_with(tmp_path, "alpha")
    _age(site)
    cache = tmp_path / "cache"
    assert "beta" not in _probe(site, cache)["plugins"]  # type: ignore[operator]
    _site_with(tmp_path, "beta")  # installed into the same, cached directory
    seen = _probe(site, cache)
    assert "beta" in seen["plugins"] and "alpha" in seen["plugins"]  # type: ignore[operator]
    _age(site)  # later: the new state is cached, and still right
    assert "beta" in _probe(site, cache)["plugins"]  # type: ignore[operator]
    assert _probe(site, cache)["metadata_imported"] is False
    for info in site.glob("acme_beta-*.dist-info"):
        for file in info.iterdir():
            file.unlink()
        info.rmdir()
    after = _probe(site, cache)
    assert "beta" not in after["plugins"] and "alpha" in after["plugins"]  # type: ignore[operator]


@pytest.mark.timeout(120)
def test_a_directory_changed_moments_ago_is_read_afresh_every_time(tmp_path: Path) -> None:
    site = _site_with(tmp_path, "alpha")  # just written: within the racy window
    cache = tmp_path / "cache"
    for _ in range(2):
        probed = _probe(site, cache)
        assert "alpha" in probed["plugins"]  # type: ignore[operator]
        assert probed["metadata_imported"] is True


@pytest.mark.timeout(120)
def test_a_directory_changed_in_the_clocks_future_is_cached_and_a_later_install_still_seen(tmp_path: Path) -> None:
    """The wall clock stepped back (NTP, a virtual machine resumed) after an install: the directory's time is
    ahead of the clock. Before, it counted as changed moments ago until the clock caught up (an hour here), so
    every start read all metadata afresh (about 30 ms). Its time still identifies its state: a later install
    changes it (to another time, earlier or not), and is seen at the next start."""
    site = _site_with(tmp_path, "alpha")
    _age(site, -3600.0)  # an hour ahead of the clock
    cache = tmp_path / "cache"
    assert _probe(site, cache)["metadata_imported"] is True
    warm = _probe(site, cache)
    assert "alpha" in warm["plugins"] and warm["metadata_imported"] is False  # type: ignore[operator]
    _site_with(tmp_path, "beta")  # installed now: the directory's time moves back to the clock's
    _age(site)
    seen = _probe(site, cache)
    assert "beta" in seen["plugins"] and "alpha" in seen["plugins"]  # type: ignore[operator]


@pytest.mark.timeout(120)
def test_a_cache_of_another_user_or_garbage_is_ignored_and_off_writes_none(tmp_path: Path) -> None:
    site = _site_with(tmp_path, "alpha")
    _age(site)
    cache = tmp_path / "cache"
    _probe(site, cache)
    (cache_file,) = cache.glob("entry-points-*.json")
    # A cache that claims a plugin which is not installed must never be believed when it is not ours.
    data = json.loads(cache_file.read_text())
    directories = data["directories"]
    entry = directories[str(site)]
    entry[1].append(["planted", "planted", "1.0", {"kservice": [["planted", "os"]]}])
    cache_file.write_text(json.dumps(data))
    if os.getuid() == 0:
        os.chown(cache_file, 4242, 4242)
        assert "planted" not in _probe(site, cache)["plugins"]  # type: ignore[operator]
        os.chown(cache_file, 0, 0)
    cache_file.write_text("{not json")
    assert "alpha" in _probe(site, cache)["plugins"]  # type: ignore[operator]
    assert json.loads(cache_file.read_text())["format"]  # rewritten
    # Well-formed JSON of the wrong shape inside: that entry is dropped and its directory read afresh.
    data = json.loads(cache_file.read_text())
    data["directories"][str(site)][1] = [["only", "three"]]  # its modification time kept: it would be used
    data["directories"]["/elsewhere"] = "not an entry"
    cache_file.write_text(json.dumps(data))
    assert "alpha" in _probe(site, cache)["plugins"]  # type: ignore[operator]
    off = tmp_path / "off"
    assert "alpha" in _probe(site, "off")["plugins"]  # type: ignore[operator]
    assert not off.exists()


def test_the_cached_entry_points_are_what_importlib_metadata_finds() -> None:
    from importlib.metadata import entry_points as metadata_entry_points

    from kservice._entrypoints import GROUPS, entry_points

    for group in GROUPS:
        expected = sorted(
            (ep.name, ep.value, ep.dist.name if ep.dist else None) for ep in metadata_entry_points(group=group)
        )
        found = sorted((ep.name, ep.value, ep.dist.name if ep.dist else None) for ep in entry_points(group))
        assert found == expected, group
    assert {"inproc", "mmap"} <= {ep.name for ep in entry_points("kservice")}
