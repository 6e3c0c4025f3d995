"""The SLURM profile on a real single-node SLURM cluster (issue 5: scale-out, tested for real).

tests/slurm/cluster.sh installs Debian's slurm + munge and starts slurmctld/slurmd on this machine;
the node advertises two fake GPUs (GRES), so a rule that requests ``gpu: 1`` is scheduled with
CUDA_VISIBLE_DEVICES set by SLURM. The test profile is profiles/slurm/config.yaml with its
placeholders filled in for this cluster; the data preparation and the pretraining arm (a GPU rule)
run through it, and their outputs must equal the local ``demo_run``. A second job pretrains as two
SLURM tasks (srun-launched DDP ranks, gloo on CPU) and must train like the local single process.
Skipped only where the machine cannot host the cluster: not root, no apt-get, or no network for
the packages.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from conftest import REPO, SNAKEFILE, snakemake, write_config
from test_ddp import assert_backbone_like_single_process

SLURM_TEST = [pytest.mark.slow, pytest.mark.slurm]

CLUSTER = REPO / "tests/slurm/cluster.sh"
DAEMONS = ("slurmctld", "slurmd", "munged", "sbatch", "squeue")
# apt-get messages that mean "no way to fetch packages", not "broken packages".
NO_NETWORK = re.compile(r"Temporary failure resolving|Could not resolve|Failed to fetch|Unable to locate package|"
                        r"Network is unreachable|Connection timed out|Unable to fetch some archives")
# What runs through SLURM: all of data preparation and the pretraining arm (gpu: 1 in the profile).
TARGETS = ["results/prepare/vindr/split.csv", *(f"results/prepare/vindr/coco_{s}.json" for s in ("train", "val", "test")),
           "results/pretrain/barlowtwins/backbone.pth"]
GPU_RULE, CPU_RULE = "pretrain", "split_vindr"


def _free_port_pair() -> int:
    """A port p with p and p+1 free (slurmctld, slurmd), so another test cluster cannot clash."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port < 65000:
            with socket.socket() as s2:
                try:
                    s2.bind(("127.0.0.1", port + 1))
                except OSError:
                    continue
            return port
    raise RuntimeError("no free pair of ports for the test SLURM cluster")


@pytest.fixture(scope="module")
def slurm_cluster(tmp_path_factory):
    """A running single-node cluster; yields the environment to talk to it and stops it after."""
    if os.geteuid() != 0:
        pytest.skip("installing and starting SLURM daemons needs root")
    if shutil.which("apt-get") is None and not all(shutil.which(d) for d in DAEMONS):
        pytest.skip("SLURM is not installed and apt-get is unavailable to install it")
    install = subprocess.run([str(CLUSTER), "install"], capture_output=True, text=True, timeout=900)
    if install.returncode != 0:
        out = install.stdout + install.stderr
        if NO_NETWORK.search(out):
            pytest.skip(f"cannot download the SLURM packages (no network): {out.strip()[-500:]}")
        pytest.fail(f"installing SLURM failed:\n{out[-4000:]}")
    state = tmp_path_factory.mktemp("slurm")
    env = dict(os.environ, SLURM_CONF=str(state / "slurm.conf"), SLURM_TEST_PORT=str(_free_port_pair()))
    try:
        start = subprocess.run([str(CLUSTER), "start", str(state)], capture_output=True, text=True, env=env,
                               timeout=300)
        assert start.returncode == 0, f"SLURM did not start:\n{start.stdout}\n{start.stderr}"
        yield env
    finally:
        subprocess.run([str(CLUSTER), "stop", str(state)], env=env, timeout=120)


def slurm_test_profile(folder: Path, node_cpus: int) -> Path:
    """profiles/slurm with its placeholders filled for the test cluster and sizes that fit the node.

    Partition `debug` (the only one), no account (no accounting here), squeue for job states
    because sacct has no accounting daemon to ask (REFERENCE.md 4), short first status check.
    """
    text = (REPO / "profiles/slurm/config.yaml").read_text()
    placeholders = set(re.findall(r'"<[^">]+>"', text))
    assert placeholders == {'"<partition>"', '"<account>"', '"<gpu-partition>"'}, placeholders
    profile = yaml.safe_load(text.replace('"<partition>"', "debug").replace('"<gpu-partition>"', "debug"))
    assert profile["default-resources"].pop("slurm_account") == "<account>"
    profile["slurm-status-command"] = "squeue"
    profile["slurm-init-seconds-before-status-checks"] = 1
    profile["latency-wait"] = 5
    profile["retries"] = 0
    # The test node has a couple of cores and a few GB: same requests, scaled to fit it.
    profile["set-threads"] = {rule: min(n, node_cpus) for rule, n in profile["set-threads"].items()}
    for res in (profile["default-resources"], *profile["set-resources"].values()):
        if "mem_mb" in res:
            res["mem_mb"] = min(res["mem_mb"], 1500)
    gpu_rules = {rule for rule, res in profile["set-resources"].items() if res.get("gpu")}
    assert {"pretrain", "linear_eval", "train_detector", "heatmaps"} <= gpu_rules
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.yaml").write_text(yaml.safe_dump(profile, sort_keys=False))
    return folder


@pytest.fixture(scope="module")
def slurm_run(slurm_cluster, demo_run, tmp_path_factory):
    """Data preparation + pretraining through the SLURM profile, in a fresh folder."""
    workdir = tmp_path_factory.mktemp("slurm_run")
    shutil.copy(demo_run / "config.yaml", workdir / "config.yaml")
    # as many threads as the local run had (--cores 2), so CPU training gives the same numbers
    profile = slurm_test_profile(workdir / "profile", node_cpus=2)
    env = dict(slurm_cluster, CXRSSL_PROGRESS="0", PYTHONHASHSEED="0")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    # targets before --configfile, which takes every following word as a config file
    cmd = [sys.executable, "-m", "snakemake", *TARGETS, "-s", str(SNAKEFILE), "--profile", str(profile),
           "--configfile", "config.yaml"]
    # cwd = workdir: the plugin puts slurm-logdir under the folder Snakemake was started in.
    proc = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True, env=env, timeout=1500)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"snakemake through SLURM failed:\n{out[-8000:]}"
    yield workdir, out
    shutil.rmtree(workdir, ignore_errors=True)


# The DDP job: pretraining as 2 SLURM tasks on the one node, one fake GPU and one CPU each (the
# documented layout, one task per GPU); CUDA is not really there, so the ranks run gloo on CPU.
DDP_TASKS = 2
DDP_RESOURCES = {"tasks": DDP_TASKS, "mpi": "srun", "gpu": DDP_TASKS, "tasks_per_gpu": 1}


@pytest.fixture(scope="module")
def slurm_ddp_run(slurm_cluster, demo_run, tmp_path_factory):
    """Only the pretraining job, through the SLURM profile as DDP_TASKS tasks, on demo_run's prepared data.

    --allowed-rules keeps data preparation out of the DAG: the copied NIH index and cache are its inputs.
    """
    workdir = tmp_path_factory.mktemp("slurm_ddp")
    shutil.copy(demo_run / "config.yaml", workdir / "config.yaml")
    prepared = workdir / "results/prepare/nih"
    prepared.mkdir(parents=True)
    for src in [demo_run / "results/prepare/nih/index.csv", *(demo_run / "results/prepare/nih").glob("cache_*px.npy")]:
        shutil.copy2(src, prepared / src.name)
    profile_file = slurm_test_profile(workdir / "profile", node_cpus=2) / "config.yaml"
    profile = yaml.safe_load(profile_file.read_text())
    profile["set-resources"][GPU_RULE].update(DDP_RESOURCES)
    profile["set-threads"][GPU_RULE] = 1  # CPUs per task: the node's 2 cores hold both tasks
    profile_file.write_text(yaml.safe_dump(profile, sort_keys=False))
    env = dict(slurm_cluster, CXRSSL_PROGRESS="0", PYTHONHASHSEED="0")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    cmd = [sys.executable, "-m", "snakemake", TARGETS[-1], "-s", str(SNAKEFILE), "--profile", str(profile_file.parent),
           "--allowed-rules", GPU_RULE, "--configfile", "config.yaml"]
    proc = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True, env=env, timeout=900)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"DDP pretraining through SLURM failed:\n{out[-8000:]}"
    yield workdir, out
    shutil.rmtree(workdir, ignore_errors=True)


def test_profiles_name_only_rules_of_the_workflow(tmp_path):
    """A misspelt rule in set-resources/set-threads is silently ignored by Snakemake: catch it here."""
    proc = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(SNAKEFILE), "--list-rules"], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rules = set(proc.stdout.split())
    assert {"pretrain", "collect_metrics", "stage_detection"} <= rules
    profile = yaml.safe_load((REPO / "profiles/slurm/config.yaml").read_text())
    named = set(profile["set-resources"]) | set(profile["set-threads"])
    assert named <= rules, f"profiles/slurm names unknown rules: {sorted(named - rules)}"
    # every rule that does work has its resources in the cluster profile
    stage_targets = {r for r in rules if r.startswith("stage_")} | {"all"}
    assert rules - stage_targets - set(profile["set-resources"]) == set(), sorted(rules - stage_targets - set(profile["set-resources"]))


def test_tasks_resource_starts_one_rank_per_slurm_task(tmp_path, tiny_config):
    """The launcher (rules/common.smk torch_launcher): `tasks: N` + `mpi: srun` start N ranks with srun."""
    write_config(tmp_path / "config.yaml", tiny_config)
    (tmp_path / "results/prepare/nih").mkdir(parents=True)  # pretraining's inputs: only their names matter here
    for name in ("index.csv", f"cache_{tiny_config['nih']['cache_size']}px.npy"):
        (tmp_path / "results/prepare/nih" / name).touch()

    def pretrain(*resources: str, dry: bool = True) -> str:
        proc = snakemake(tmp_path, TARGETS[-1], "--allowed-rules", GPU_RULE, *(["-n", "-p"] if dry else []),
                         "--set-resources", *(f"{GPU_RULE}:{r}" for r in resources), check=False, timeout=300)
        return proc.stdout + proc.stderr

    out = pretrain("tasks=2", "mpi=srun", "gpu=2", "tasks_per_gpu=1")
    assert re.search(r"export MASTER_ADDR MASTER_PORT; srun --ntasks=2 --cpus-per-task=\d+ "
                     r'--kill-on-bad-exit=1 "\$CXRSSL_PY" "\$CXRSSL_SCRIPTS/pretrain.py"', out), out[-3000:]
    assert "torch.distributed.run" not in out
    out = pretrain("tasks_per_node=2", "nodes=2", "mpi=srun", "gres=gpu:2")  # 2 nodes x 2 GPUs
    assert "srun --ntasks=4 --nodes=2 --ntasks-per-node=2 --cpus-per-task=" in out, out[-3000:]
    assert 'tasks need mpi: "srun"' in pretrain("tasks=2")  # the plugin would wrap the job in its own srun
    assert "needs tasks_per_gpu: 1" in pretrain("tasks=2", "mpi=srun", "gpu=2")
    assert "torch.distributed.run --standalone --nproc_per_node=2" in pretrain("gpu=2")  # one node, one task
    # outside a SLURM job the ranks cannot start: the job fails at once, saying why
    assert "start one rank per SLURM task: run with --profile profiles/slurm" in pretrain("tasks=2", "mpi=srun",
                                                                                       dry=False)


def _slurm_logs(workdir: Path, rule: str) -> list[Path]:
    """The sbatch logs of a rule (plugin 2.8.0: slurm-logdir/rule_<rule>/<wildcards>/<jobid>.log)."""
    return sorted((workdir / "results/logs/slurm" / f"rule_{rule}").rglob("*.log"))


@pytest.mark.slow
@pytest.mark.slurm
def test_jobs_ran_as_slurm_jobs(slurm_run):
    workdir, out = slurm_run
    assert out.count("has been submitted with SLURM jobid") == 7, out[-4000:]
    for rule in ("make_demo_data", "convert_dicom", "index_nih", "split_vindr", "fuse_boxes", GPU_RULE):
        logs = _slurm_logs(workdir, rule)
        assert logs, f"no sbatch log for {rule} under results/logs/slurm (jobs did not go through SLURM?)"
        assert "cxrssl-test-node: SLURM_JOB_ID=" in logs[0].read_text(), logs[0]


@pytest.mark.slow
@pytest.mark.slurm
def test_gpu_rule_gets_a_gpu_from_slurm(slurm_run):
    workdir, _ = slurm_run
    # the node's task prolog prints what SLURM set for the job (cluster.sh)
    gpu_log = _slurm_logs(workdir, GPU_RULE)[0].read_text()
    match = re.search(r"cxrssl-test-node: SLURM_JOB_ID=(\d+) CUDA_VISIBLE_DEVICES=(\S+)", gpu_log)
    assert match and re.fullmatch(r"\d+", match.group(2)), gpu_log[:2000]
    cpu_log = _slurm_logs(workdir, CPU_RULE)[0].read_text()
    assert "CUDA_VISIBLE_DEVICES=unset" in cpu_log, cpu_log[:2000]


@pytest.mark.slow
@pytest.mark.slurm
def test_prepared_data_equals_the_local_run(slurm_run, demo_run):
    workdir, _ = slurm_run
    for target in TARGETS[:-1]:
        assert (workdir / target).read_bytes() == (demo_run / target).read_bytes(), target


@pytest.mark.slow
@pytest.mark.slurm
def test_pretrained_backbone_equals_the_local_run(slurm_run, demo_run):
    workdir, _ = slurm_run
    target = TARGETS[-1]
    remote = torch.load(workdir / target, map_location="cpu", weights_only=True)
    local = torch.load(demo_run / target, map_location="cpu", weights_only=True)
    assert remote.keys() == local.keys()
    differ = [k for k in local if not torch.equal(remote[k], local[k])]
    assert not differ, f"{len(differ)} tensors differ from the local run, e.g. {differ[:3]}"


@pytest.mark.slow
@pytest.mark.slurm
def test_nothing_left_to_do_locally_after_the_slurm_run(slurm_run):
    """Outputs made on the cluster count as up to date for a local Snakemake (same metadata)."""
    workdir, _ = slurm_run
    proc = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(SNAKEFILE), "--configfile", "config.yaml",
                           "-n", "--cores", "1", *TARGETS], cwd=workdir, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "Nothing to be done" in proc.stdout + proc.stderr, (proc.stdout + proc.stderr)[-4000:]


@pytest.mark.slow
@pytest.mark.slurm
def test_pretraining_as_two_slurm_tasks_equals_one_process(slurm_ddp_run, demo_run):
    """Issue 15: srun-launched ranks (one per SLURM task) train like one process with the global batch.

    Reference: demo_run's local single-process pretraining, same config (global batch 16, 1 torch
    thread a process). Tolerances are tests/test_ddp.py's for gloo against one process.
    """
    workdir, out = slurm_ddp_run
    assert out.count("has been submitted with SLURM jobid") == 1, out[-4000:]
    log = (workdir / "results/logs/pretrain/barlowtwins.log").read_text()
    assert f"global batch 16 on {DDP_TASKS} process(es)" in log, log[-2000:]
    # the node's task prolog runs for the batch script and for each srun task, all in one job
    sbatch_log = _slurm_logs(workdir, GPU_RULE)[0].read_text()
    tasks = re.findall(r"cxrssl-test-node: SLURM_JOB_ID=(\d+) CUDA_VISIBLE_DEVICES=(\S+)", sbatch_log)
    assert len(tasks) == 1 + DDP_TASKS and len({job for job, _ in tasks}) == 1, sbatch_log[:3000]
    # each task sees the job's GPUs on its node (a rank takes cuda:SLURM_LOCALID), none bound to one task
    assert {gpus for _, gpus in tasks} == {"0,1"}, tasks

    ddp = pd.read_csv(workdir / "results/pretrain/barlowtwins/metrics.csv")
    one = pd.read_csv(demo_run / "results/pretrain/barlowtwins/metrics.csv")
    assert ddp["step"].tolist() == one["step"].tolist() == [1, 2, 3, 4]
    assert ddp["loss"][0] == pytest.approx(one["loss"][0], rel=1e-5)  # same weights, same global batch
    assert ddp["loss"].tolist() == pytest.approx(one["loss"].tolist(), rel=1e-4)
    worst = assert_backbone_like_single_process(workdir / TARGETS[-1], demo_run / TARGETS[-1],
                                                seed=yaml.safe_load((workdir / "config.yaml").read_text())["seed"])
    print(f"2 SLURM tasks vs 1 process: largest difference of a backbone tensor {worst:.2e}, of a step's loss "
          f"{(ddp['loss'] - one['loss']).abs().max():.2e}")
