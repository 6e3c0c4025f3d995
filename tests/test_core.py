"""Shared building blocks: atomic outputs, the quarantine, the class table, backbone loading."""

import os

import pytest
import torch
import torchvision

from cxrssl import classes
from cxrssl.errors import BadInputError, Quarantine
from cxrssl.io import atomic_path, atomic_torch_save, atomic_write_json
from cxrssl.models import backbone


def test_atomic_write_leaves_old_file_intact_on_failure(tmp_path):
    target = tmp_path / "out.json"
    atomic_write_json({"v": 1}, target)
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed mid-write")
    assert target.read_text().strip().endswith("}") and '"v": 1' in target.read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]


def test_identical_checkpoints_are_identical_files(tmp_path):
    """Two saves of the same tensors (other folders, other names, other temporary files) give the same
    bytes, so content hashes of checkpoints (run fingerprints, DVC) agree between identical runs."""
    import hashlib

    state = {"w": torch.arange(12.0).reshape(3, 4), "meta": {"arch": "resnet18"}}
    atomic_torch_save(state, tmp_path / "a" / "backbone.pth")
    atomic_torch_save(state, tmp_path / "b" / "backbone.pth")
    atomic_torch_save(state, tmp_path / "b" / "other.pth")
    digests = {hashlib.sha256(p.read_bytes()).hexdigest() for p in tmp_path.rglob("*.pth")}
    assert len(digests) == 1
    assert torch.equal(torch.load(tmp_path / "a" / "backbone.pth", weights_only=True)["w"], state["w"])


def test_atomic_outputs_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write_json({}, tmp_path / "a.json")
    finally:
        os.umask(old)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o644


def test_quarantine_fails_or_records_by_policy(tmp_path):
    error = BadInputError("train/abc.dicom", "no PixelData")
    with pytest.raises(BadInputError, match="train/abc.dicom: no PixelData"):
        Quarantine("fail").add(error)
    q = Quarantine("skip", stage="convert")
    q.add(error)
    q.write(tmp_path / "q.csv")
    assert (tmp_path / "q.csv").read_text().splitlines() == [
        "stage,item,reason", "convert,train/abc.dicom,no PixelData"]
    with pytest.raises(ValueError, match="on_bad_input"):
        Quarantine("ignore")


def test_class_table_is_the_vindr_spelling_and_is_checked():
    assert len(classes.VINDR_CLASSES) == 14 and classes.VINDR_CLASSES[8] == "Nodule/Mass"
    assert [c["id"] for c in classes.coco_categories()] == list(range(1, 15))
    renamed = [c.replace("Nodule/Mass", "Nodule_Mass") for c in classes.VINDR_CLASSES]
    with pytest.raises(ValueError, match="Nodule_Mass"):
        classes.check_class_names(renamed, "mmdet config")
    with pytest.raises(KeyError, match="Nodule_Mass"):
        classes.class_id("Nodule_Mass")


def test_imagenet_init_from_a_local_state_dict(tmp_path):
    reference = torchvision.models.resnet18()
    path = tmp_path / "resnet18-imagenet.pth"
    torch.save(reference.state_dict(), path)
    model = backbone.build_resnet("resnet18", "imagenet", imagenet_weights=path)
    for name, tensor in reference.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name


def test_imagenet_init_offline_names_what_to_download(monkeypatch):
    def offline(self, *args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(torchvision.models.WeightsEnum, "get_state_dict", offline)
    with pytest.raises(backbone.WeightsUnavailableError) as info:
        backbone.build_resnet("resnet50", "imagenet")
    message = str(info.value)
    assert "resnet50-11ad3fa6.pth" in message and "imagenet_weights" in message


def test_checkpoint_init_strips_wrappers_and_rejects_a_wrong_arch(tmp_path):
    source = torchvision.models.resnet18()
    wrapped = {"state_dict": {f"module.backbone.{k}": v for k, v in backbone.backbone_state_dict(source).items()}}
    path = tmp_path / "ckpt.pth"
    torch.save(wrapped, path)
    model = backbone.build_resnet("resnet18", str(path))
    assert torch.equal(model.conv1.weight, source.conv1.weight)
    with pytest.raises(ValueError, match="does not fit"):
        backbone.build_resnet("resnet50", str(path))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        backbone.build_resnet("resnet18", str(tmp_path / "missing.pth"))


def test_exported_backbone_loads_into_torchvision_unchanged(tmp_path):
    model = backbone.build_resnet("resnet18", "random")
    path = tmp_path / "backbone.pth"
    atomic_torch_save(backbone.backbone_state_dict(model), path)
    fresh = torchvision.models.resnet18()
    result = fresh.load_state_dict(torch.load(path, weights_only=True), strict=False)
    assert sorted(result.missing_keys) == ["fc.bias", "fc.weight"] and not result.unexpected_keys


# --- atomic writes on a full disk, output locks, supervised workers ----------------------------

def test_a_failed_write_names_the_file_and_the_reason(tmp_path, monkeypatch):
    import errno

    def full(src, dst):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "replace", full)
    with pytest.raises(OSError) as info:
        atomic_write_json({"v": 1}, tmp_path / "out" / "metrics.json")
    assert info.value.errno == errno.ENOSPC
    assert str(tmp_path / "out" / "metrics.json") in str(info.value) and "No space left" in str(info.value)
    assert list((tmp_path / "out").iterdir()) == []  # no temporary file left behind


def test_exclusive_lock_refuses_a_second_job_and_dies_with_its_holder(tmp_path):
    from worker_tasks import hold_lock

    from cxrssl.io import OutputBusyError, exclusive_lock

    lock = tmp_path / "out" / ".lock"
    holder = hold_lock(lock)
    try:
        with pytest.raises(OutputBusyError, match=rf"the folder out is being written by another job \(pid {holder.pid}"):
            with exclusive_lock(lock, "the folder out"):
                pass
    finally:
        holder.kill()  # as kill -9 would: the kernel releases the lock
        holder.wait()
    with exclusive_lock(lock, "the folder out"):
        with pytest.raises(OutputBusyError):  # a second holder in the same process is refused too
            with exclusive_lock(lock, "the folder out"):
                pass


def test_worker_pool_survives_killed_crashed_and_hanging_workers():
    import worker_tasks
    from cxrssl.data.workers import TaskFailed, run_tasks

    tasks = [("ok", i) for i in range(6)] + [("kill", 0), ("segv", 0), ("sleep", 60)] + [("ok", i) for i in range(6, 12)]
    out = dict(run_tasks(worker_tasks.work, tasks, 2, timeout_s=3))
    assert sorted(out) == list(range(len(tasks)))  # every task answered: nothing hangs
    assert all(out[i] == 2 * n for i, (kind, n) in enumerate(tasks) if kind == "ok")
    assert "killed by SIGKILL" in out[6].reason and "(2 attempts)" in out[6].reason  # retried once
    assert "killed by SIGSEGV" in out[7].reason
    assert "stopped after 3 s" in out[8].reason and "attempts" not in out[8].reason  # a hang is not retried
    assert all(isinstance(out[i], TaskFailed) for i in (6, 7, 8))


def test_worker_pool_raises_for_errors_that_are_not_the_task():
    import worker_tasks
    from cxrssl.data.workers import WorkerError, run_tasks

    with pytest.raises(WorkerError, match="ValueError: boom"):
        dict(run_tasks(worker_tasks.work, [("ok", 1), ("raise", 0)], 1))
    with pytest.raises(WorkerError, match="could not start .*exited with status 3"):
        dict(run_tasks(worker_tasks.work, [("ok", 1)] * 3, 1, initializer=worker_tasks.cannot_start))


def test_closing_the_pool_early_stops_its_workers():
    import psutil
    import worker_tasks
    from cxrssl.data.workers import run_tasks

    stream = run_tasks(worker_tasks.work, [("ok", 1)] + [("sleep", 60)] * 3, 2)
    next(stream)
    workers = worker_tasks.pool_workers()
    assert len(workers) == 2
    stream.close()
    gone, alive = psutil.wait_procs(workers, timeout=10)
    assert not alive
