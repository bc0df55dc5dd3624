"""launcher.doctor on the GPU presets, on this CPU machine: their paths pointed at layout stand-ins (tests/stand_ins.py)
under `paths.models` / `paths.data`, every check but the GPU one passes, the GPU one says why it cannot, and the
launch plan is printed. A wrong architecture and a node-local output for a multi-node preset are caught by name."""

import pytest

from config import load_config
from launcher.doctor import SHARED_FS, main, mount_of
from tests.stand_ins import policy_stand_in, preset_stand_ins


def lines_by_check(out):
    return {line.split()[0]: line for line in out.splitlines() if line.split()[:2][-1:] in (["ok"], ["FAIL"])}


@pytest.fixture
def places(tmp_path):
    return [f"paths.models={tmp_path / 'models'}", f"paths.data={tmp_path / 'data'}",
            f"trainer.output_dir={tmp_path / 'runs' / 'r'}"]


@pytest.mark.parametrize("preset", ["vace_1.3b_8gpu.yaml", "phantom_1.3b_8gpu.yaml", "vace_1.3b_8gpu_colocated.yaml"])
def test_single_node_presets_check_everything_but_the_gpu_and_plan(root, places, capsys, preset):
    config = str(root / "cluster_configs" / preset)
    preset_stand_ins(load_config(config, places))
    assert main(["--config", config, *places]) == 1  # no GPU here
    out = capsys.readouterr().out
    checks = lines_by_check(out)
    for name in ("weights", "data", "output", "resume"):
        assert checks[name].split()[1] == "ok", checks[name]
    assert "Wan2.1-" in checks["weights"] and "identity_reward" in checks["weights"]
    assert checks["device"].split()[1] == "FAIL" and "sees no CUDA GPU" in checks["device"]
    assert "GPUs on one node: 8" in out and "doctor: 1 check(s) failed: device" in out
    assert "evaluation (make eval WORKERS=8, cluster_configs/slurm/evaluate.sbatch): one process per GPU, 1 GPU" in out
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.startswith("  ") and
            line.split()[0] in ("rollout", "reward", "learner")}
    cfg = load_config(config, places)
    for role in ("rollout", "reward", "learner"):
        assert int(rows[role][1]) == cfg.workers[role].num_workers
        assert float(rows[role][-1]) > 1.0  # planned host GiB per process, from the named architectures


def test_multinode_preset_needs_shared_output(root, places, capsys, tmp_path):
    config = str(root / "cluster_configs" / "vace_14b_multinode.yaml")
    preset_stand_ins(load_config(config, places))
    main(["--config", config, *places])
    out = capsys.readouterr().out
    checks = lines_by_check(out)
    assert checks["weights"].split()[1] == "ok" and "Wan2.1-VACE-14B" in checks["weights"]
    _, fs = mount_of(str(tmp_path))
    if fs in SHARED_FS:
        assert checks["output"].split()[1] == "ok" and "shared" in checks["output"]
    else:
        assert checks["output"].split()[1] == "FAIL" and f"is on {fs}" in checks["output"], checks["output"]
    assert "one per node resource" in out
    main(["--config", config, *places[:2], "trainer.output_dir=outputs/rel"])  # relative, several nodes
    assert "is relative, and the roles span nodes" in lines_by_check(capsys.readouterr().out)["output"]


def test_wrong_architecture_is_named(root, places, capsys, tmp_path):
    config = str(root / "cluster_configs" / "vace_1.3b_8gpu.yaml")
    cfg = load_config(config, places)
    preset_stand_ins(cfg)
    policy_stand_in(cfg.model.path, "wan2.1-vace-14b", "vace")  # 14B weights where the 1.3B preset looks
    main(["--config", config, *places])
    weights = lines_by_check(capsys.readouterr().out)["weights"]
    assert "FAIL" in weights and "is not model.arch=wan2.1-vace-1.3b" in weights


def test_mount_of_picks_the_longest_mount(tmp_path):
    mounts = tmp_path / "mounts"
    mounts.write_text("overlay / overlay rw 0 0\nserver:/export /shared nfs4 rw 0 0\n"
                      "lustre@tcp:/fs /shared/lustre lustre rw 0 0\n")
    assert mount_of("/shared/runs/a", str(mounts)) == ("/shared", "nfs4")
    assert mount_of("/shared/lustre/x", str(mounts)) == ("/shared/lustre", "lustre")
    assert mount_of("/home/me", str(mounts)) == ("/", "overlay")
