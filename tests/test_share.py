"""Remote-cached artifacts: what one machine built, no other machine builds again.

The session's demo build (conftest ``built_repo``) is machine A; it shares once
(``make share``) to a temporary local remote.  Every other machine is a copy of
the repository (``copy_repo``: the files git sees and dvc.lock, no outputs) with
its own empty DVC cache and its ``shared`` remote pointed at a temporary remote
in ``.dvc/config.local``, never at the default one.  What ran is read from
DVC's output: ``Running stage`` is a computation; ``Pulling data for stage`` and
``Stage ... is cached`` are restores.  A push stage may run anywhere (publishing
is not a computation); every other stage must not.
"""

from __future__ import annotations

import filecmp
import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from configobj import ConfigObj

from stages.sharing.remote import RemoteState, probe
from tests.pipeline import FOLDER_STAGE, RAN, RELEASES, copy_repo, pushes, run, status
from tests.s3_server import S3Server, free_port

REPO = Path(__file__).resolve().parent.parent
TRAINERS = ("sft", "kto")
BUCKET = "llm-release"
SECTION = 'remote "shared"'


# --- helpers -------------------------------------------------------------------------

def sh(cmd: list[str], cwd: Path, env: dict[str, str] | None = None,
       check: bool = True) -> subprocess.CompletedProcess:
    """``cmd`` in ``cwd``; on failure (with ``check``) show all of its output."""
    res = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    if check and res.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {res.returncode}\n--- stdout\n"
                             f"{res.stdout[-6000:]}\n--- stderr\n{res.stderr[-6000:]}")
    return res


def point_remote(repo: Path, url: str | Path, **options: str) -> None:
    """Point ``repo``'s ``shared`` remote at ``url`` in .dvc/config.local (this clone only)."""
    path = repo / ".dvc/config.local"
    config = ConfigObj(str(path))
    config[SECTION] = {"url": str(url), **options}
    config.write()


def computed(output: str) -> set[str]:
    """The stages a command ran, push stages aside."""
    return {s for s in RAN.findall(output) if not s.startswith("push@")}


def objects(root: Path) -> dict[str, int]:
    """The objects under a DVC cache or local remote: ``ab/cdef...`` -> bytes."""
    files = root / "files/md5"
    return {str(p.relative_to(files)): p.stat().st_size
            for p in files.rglob("*") if p.is_file()} if files.is_dir() else {}


def object_of(cache: Path, md5: str) -> Path:
    return cache / "files/md5" / md5[:2] / md5[2:]


def lock_stages(repo: Path) -> dict[str, dict]:
    return yaml.safe_load((repo / "dvc.lock").read_text())["stages"]


def out_md5(repo: Path, stage: str, path: str) -> str:
    """The md5 dvc.lock records for one output of one stage."""
    return next(o["md5"] for o in lock_stages(repo)[stage]["outs"] if o["path"] == path)


def release_objects(repo: Path, trainer: str) -> set[str]:
    """The objects of each ``build/<trainer>/<format>``: its .dir listing and every file."""
    found = set()
    for fmt in RELEASES[trainer]:
        listing = out_md5(repo, f"{FOLDER_STAGE[fmt]}@{trainer}", f"build/{trainer}/{fmt}")
        files = json.loads(object_of(repo / ".dvc/cache", listing).read_text())
        found |= {f"{m[:2]}/{m[2:]}" for m in [listing, *(f["md5"] for f in files)]}
    return found


def assert_same_release(a: Path, b: Path, trainer: str) -> None:
    """``b`` holds ``a``'s release of ``trainer`` (every format), byte for byte."""
    for fmt in RELEASES[trainer]:
        folder = Path("build") / trainer / fmt
        names = sorted(p.name for p in (a / folder).iterdir())
        assert sorted(p.name for p in (b / folder).iterdir()) == names
        for name in names:
            assert filecmp.cmp(a / folder / name, b / folder / name, shallow=False), name
    assert filecmp.cmp(a / "build" / trainer / "manifest.json",
                       b / "build" / trainer / "manifest.json", shallow=False)


def assert_published(repo: Path, built: Path, trainer: str) -> None:
    """``repo`` published exactly ``built``'s release of ``trainer``."""
    release, target = built / "build" / trainer / "gguf", repo / "published" / trainer / "gguf"
    assert sorted(p.name for p in target.iterdir()) == sorted(p.name for p in release.iterdir())
    for path in release.iterdir():
        assert filecmp.cmp(path, target / path.name, shallow=False), path.name


def flip_one_byte(path: Path) -> None:
    """Replace ``path`` (a new inode: remote copies may share it) with one byte changed."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.unlink()
    path.write_bytes(bytes(data))


# --- fast: the configuration ------------------------------------------------------------

def outputs(stage: dict) -> list[tuple[str, dict]]:
    """Every output of a dvc.yaml stage (outs, metrics, plots) with its options."""
    found = []
    for key in ("outs", "metrics", "plots"):
        for entry in stage.get(key, []):
            found += [(entry, {})] if isinstance(entry, str) else list(entry.items())
    return [(path, options or {}) for path, options in found]


def test_every_output_is_shared_and_only_the_push_receipt_is_not() -> None:
    """DVC restores a stage from the run-cache only when all of its outputs are on the
    remote: no output may be ``push: false``, and only the receipt skips the cache."""
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    uncached = []
    for name, stage in stages.items():
        for path, options in outputs(stage.get("do", stage)):
            assert options.get("push", True) is True, f"{name}: {path} is not shared"
            if options.get("cache", True) is False:
                uncached.append((name, path, options))
    assert uncached == [("push", "build/${item.trainer}/push-${item.format}.json",
                         {"cache": False, "persist": True})]


def test_the_default_remote_is_a_folder_outside_every_clone_and_verifies_downloads() -> None:
    config = ConfigObj(str(REPO / ".dvc/config"))
    assert config["core"]["remote"] == "shared"
    remote = config[SECTION]
    assert remote["url"].startswith("~/"), "a user folder: shared by clones, no set-up"
    assert REPO not in Path(os.path.expanduser(remote["url"])).parents
    assert remote["verify"] == "true"


def test_make_help_lists_share_and_gc() -> None:
    listed = sh(["make", "-s", "help"], cwd=REPO).stdout.split("\n")
    assert {line.split()[0] for line in listed if line} >= {"demo", "push", "share", "gc"}


def test_probe_tells_data_from_empty_and_a_closed_port_in_seconds(tmp_path: Path) -> None:
    from dvc.repo import Repo

    Repo.init(str(tmp_path), no_scm=True).close()
    config = ConfigObj(str(tmp_path / ".dvc/config"))
    config["core"]["remote"] = "shared"
    config.write()
    remote = tmp_path / "remote"
    point_remote(tmp_path, remote)
    assert probe(tmp_path).status == "empty"  # not there yet: DVC creates it on push
    (remote / "files").mkdir(parents=True)
    assert probe(tmp_path).usable
    point_remote(tmp_path, f"s3://{BUCKET}/cache", endpointurl=f"http://127.0.0.1:{free_port()}")
    start = time.monotonic()
    state = probe(tmp_path)
    assert state.status == "unreachable" and time.monotonic() - start < 10
    assert len(state.notice().splitlines()) == 1
    assert state.notice().startswith(f"note: remote 'shared' (s3://{BUCKET}/cache) is unreachable")
    assert RemoteState("shared", "/x", "empty").notice() == \
        "note: remote 'shared' (/x) is empty: building here without it"


# --- slow: machines sharing the session build --------------------------------------------

SHARE_SECONDS: dict[str, float] = {}  # machine A's `make share`, for the closing note


@pytest.fixture(scope="module")
def shared_remote(built_repo: Path, module_tmp) -> Iterator[Path]:
    """Machine A (the session build) after ``make share`` to a temporary remote."""
    remote = module_tmp("share") / "remote"
    config = built_repo / ".dvc/config.local"
    before = config.read_text() if config.is_file() else None
    point_remote(built_repo, remote)
    try:
        start = time.monotonic()
        res = sh(["make", "share"], cwd=built_repo)
        SHARE_SECONDS["a"] = time.monotonic() - start
        assert "Traceback" not in res.stderr
        yield remote
    finally:
        if before is None:
            config.unlink()
        else:
            config.write_text(before)


@dataclass(frozen=True)
class Clone:
    repo: Path
    output: str
    seconds: float


@pytest.fixture(scope="module")
def clone_b(built_repo: Path, shared_remote: Path,
            module_tmp) -> Clone:
    """Machine B: a fresh copy (A's dvc.lock, no outputs, empty cache) running ``make demo``
    against A's remote, publishing to A's push target (``published/``, linked)."""
    repo = copy_repo(built_repo, module_tmp("clone_b") / "repo")
    point_remote(repo, shared_remote)
    os.symlink(built_repo / "published", repo / "published")
    start = time.monotonic()
    res = sh(["make", "demo"], cwd=repo)
    return Clone(repo, res.stdout + res.stderr, time.monotonic() - start)


def test_clone_b_recomputes_nothing_and_holds_a_byte_identical_release(
        clone_b: Clone, built_repo: Path, shared_remote: Path, record_property) -> None:
    record_property("clone_b_seconds", round(clone_b.seconds, 1))
    record_property("share_a_seconds", round(SHARE_SECONDS.get("a", 0), 1))
    record_property("remote_bytes", sum(objects(shared_remote).values()))
    assert computed(clone_b.output) == set(), clone_b.output[-4000:]
    assert set(RAN.findall(clone_b.output)) == pushes("sft") | pushes("kto")
    assert "note:" not in clone_b.output  # the remote was there and used
    for trainer in TRAINERS:
        assert_same_release(built_repo, clone_b.repo, trainer)
    assert status(clone_b.repo) == {}


def test_clone_b_publishing_to_the_same_target_uploads_nothing(clone_b: Clone) -> None:
    for trainer in TRAINERS:
        for fmt in RELEASES[trainer]:
            receipt = json.loads((clone_b.repo / "build" / trainer / f"push-{fmt}.json")
                                 .read_text())
            (pushed,) = receipt["formats"]
            assert (pushed["uploaded"], pushed["deleted"], pushed["bytes_uploaded"]) == \
                ([], [], 0)
            release = clone_b.repo / "build" / trainer / fmt
            assert sorted(pushed["skipped"]) == sorted(p.name for p in release.iterdir())


def test_make_gc_keeps_the_current_release_here_and_on_the_remote_when_asked(
        clone_b: Clone, shared_remote: Path) -> None:
    cache = clone_b.repo / ".dvc/cache"
    kept, kept_remote = objects(cache), objects(shared_remote)
    stale = "00" + "0" * 30  # an object no dvc.lock entry names: an earlier release
    for root in (cache, shared_remote):
        object_of(root, stale).parent.mkdir(parents=True, exist_ok=True)
        object_of(root, stale).write_bytes(b"an earlier release")
    sh(["make", "gc"], cwd=clone_b.repo)
    assert objects(cache) == kept
    assert object_of(shared_remote, stale).exists(), "the remote only with CLOUD=1"
    sh(["make", "gc", "CLOUD=1"], cwd=clone_b.repo)
    assert objects(shared_remote) == kept_remote
    assert status(clone_b.repo) == {}


def machine_with_one_trainer(built: Path, repo: Path, trainer: str, remote: Path) -> Path:
    """A machine that built only ``trainer`` (and the shared demo inputs), then shared:
    its dvc.lock, cache and run-cache hold that trainer's stages and no other's."""
    copy_repo(built, repo)
    mine = {name: entry for name, entry in lock_stages(repo).items()
            if name == "prepare_base" or name.split("@")[-1].split("-")[0] == trainer}
    for stage in pushes(trainer):
        mine.pop(stage)
    (repo / "dvc.lock").write_text(yaml.safe_dump({"schema": "2.0", "stages": mine}))
    dvc = str(repo / ".venv/bin/dvc")
    run([dvc, "remote", "add", "--local", "built", str(built / ".dvc/cache")], cwd=repo)
    run([dvc, "pull", "-q", "-r", "built", *mine], cwd=repo)
    run([dvc, "commit", "-q", "-f", *mine], cwd=repo)  # writes each stage's run-cache entry
    point_remote(repo, remote)
    sh(["make", "share"], cwd=repo)
    return repo


def test_split_work_a_third_machine_recomputes_nothing_and_downloads_only_the_releases(
        built_repo: Path, tmp_path: Path, record_property) -> None:
    remote = tmp_path / "remote"
    only_kto = {f"{m[:2]}/{m[2:]}" for m in [out_md5(built_repo, "merge@kto",
                                                     "build/kto/work/merged")]}
    machines = {}
    for trainer in TRAINERS:
        machines[trainer] = machine_with_one_trainer(built_repo, tmp_path / trainer, trainer,
                                                     remote)
        if trainer == "sft":
            assert not only_kto & set(objects(remote)), "sft's machine shared kto's work"
    assert only_kto <= set(objects(remote))

    # C: the dvc.lock of both machines (merged in git), nothing built, an empty cache.
    c = copy_repo(built_repo, tmp_path / "c")
    stages = {name: entry for m in machines.values() for name, entry in lock_stages(m).items()}
    (c / "dvc.lock").write_text(yaml.safe_dump({"schema": "2.0", "stages": stages}))
    point_remote(c, remote)
    for trainer in TRAINERS:
        res = sh(["make", "push", f"TRAINER={trainer}"], cwd=c)
        assert set(RAN.findall(res.stdout + res.stderr)) == pushes(trainer)
        assert_published(c, built_repo, trainer)
    downloaded = objects(c / ".dvc/cache")
    record_property("machine_c_bytes", sum(downloaded.values()))
    record_property("remote_bytes_split", sum(objects(remote).values()))
    assert set(downloaded) == release_objects(c, "sft") | release_objects(c, "kto")

    # sft's machine must not collect on the remote: its dvc.lock lacks kto's stages.
    before = objects(remote)
    res = sh(["make", "gc", "CLOUD=1"], cwd=machines["sft"], check=False)
    assert res.returncode != 0 and "dvc.lock has no entry for" in res.stderr
    assert [line for line in res.stderr.splitlines() if line.startswith("error:")] != []
    assert objects(remote) == before


def test_a_corrupted_object_on_the_remote_is_rebuilt_and_never_published(
        built_repo: Path, shared_remote: Path, tmp_path: Path) -> None:
    remote = tmp_path / "remote"
    shutil.copytree(shared_remote, remote, copy_function=os.link)  # cheap: same inodes
    name = json.loads((built_repo / "build/sft/manifest.json").read_text())["name"]
    q8 = out_md5(built_repo, "quantize@sft-Q8_0", "build/sft/work/quant/Q8_0.gguf")
    flip_one_byte(object_of(remote, q8))  # the Q8_0 GGUF: quantize's output and the release's
    c = copy_repo(built_repo, tmp_path / "c")
    point_remote(c, remote)
    res = sh(["make", "push", "TRAINER=sft"], cwd=c)
    ran = computed(res.stdout + res.stderr)
    assert "quantize@sft-Q8_0" in ran, res.stdout[-4000:]
    assert ran <= {"quantize@sft-Q8_0", "evaluate@sft-Q8_0", "card@sft"}
    assert_published(c, built_repo, "sft")
    assert filecmp.cmp(c / f"published/sft/gguf/{name}-Q8_0.gguf",
                       built_repo / "build/sft/work/quant/Q8_0.gguf", shallow=False)


def test_share_and_pull_over_s3_and_a_corrupted_object_is_rebuilt(
        built_repo: Path, tmp_path: Path) -> None:
    with S3Server(log=tmp_path / "moto.log") as s3:
        s3.create_bucket(BUCKET)
        url, endpoint = f"s3://{BUCKET}/cache", {"endpointurl": s3.endpoint}
        a = copy_repo(built_repo, tmp_path / "a", cache_from=built_repo)
        point_remote(a, url, **endpoint)
        subset = ("prepare_base", "train@sft", "merge@sft")
        sh([str(a / ".venv/bin/python"), "-m", "stages.share", *subset], cwd=a, env=s3.env())

        def fresh_machine(path: Path) -> tuple[Path, str]:
            """A copy without dvc.lock: the run-cache alone says what is on the remote."""
            repo = copy_repo(built_repo, path)
            (repo / "dvc.lock").unlink()
            point_remote(repo, url, **endpoint)
            res = sh([str(repo / ".venv/bin/dvc"), "repro", "--pull", "merge@sft"], cwd=repo,
                     env=s3.env())
            return repo, res.stdout + res.stderr

        pulled, output = fresh_machine(tmp_path / "p")
        assert RAN.findall(output) == [], output[-4000:]
        assert output.count("is cached - skipping run") == len(subset)
        merged = Path("build/sft/work/merged")
        assert not filecmp.dircmp(built_repo / merged, pulled / merged).diff_files

        # The merged shard: the one object of merge@sft that no other output shares (its
        # config and tokenizer files are byte for byte the base model's and the adapter's).
        listing = out_md5(built_repo, "merge@sft", str(merged))
        files = json.loads(object_of(built_repo / ".dvc/cache", listing).read_text())
        shard = next(f for f in files if f["relpath"].endswith(".safetensors"))
        client, key = s3.client(), f"cache/files/md5/{shard['md5'][:2]}/{shard['md5'][2:]}"
        body = bytearray(client.get_object(Bucket=BUCKET, Key=key)["Body"].read())
        body[len(body) // 2] ^= 0xFF
        client.put_object(Bucket=BUCKET, Key=key, Body=bytes(body))
        rebuilt, output = fresh_machine(tmp_path / "p2")
        assert RAN.findall(output) == ["merge@sft"], output[-4000:]
        assert filecmp.cmp(built_repo / merged / shard["relpath"],
                           rebuilt / merged / shard["relpath"], shallow=False)


def test_an_unreachable_or_empty_remote_is_said_once_and_the_pipeline_builds_here(
        built_repo: Path, tmp_path: Path) -> None:
    repo = copy_repo(built_repo, tmp_path / "repo", cache_from=built_repo)
    for receipt in repo.glob("build/*/push-*.json"):
        receipt.unlink()
    point_remote(repo, f"s3://{BUCKET}/cache", endpointurl=f"http://127.0.0.1:{free_port()}")
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")} | {
        "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
    res = sh(["make", "push", "TRAINER=sft"], cwd=repo, env=env)
    out = res.stdout + res.stderr
    said = [line for line in out.splitlines() if "s3://" in line or "unreachable" in line]
    assert len(said) == 1 and said[0].startswith("note: remote 'shared' (s3://"), said
    assert "ERROR" not in out and "Traceback" not in out
    assert set(RAN.findall(out)) == pushes("sft")

    point_remote(repo, tmp_path / "empty")
    res = sh(["make", "demo"], cwd=repo)
    out = res.stdout + res.stderr
    assert sum("is empty" in line for line in out.splitlines()) == 1
    assert "ERROR" not in out and "Traceback" not in out
    assert set(RAN.findall(out)) == pushes("kto")
